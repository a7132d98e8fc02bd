module optserve.dev/client

go 1.19
