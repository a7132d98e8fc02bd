"""HTTP only: routes, request parsing, response encoding and the mapping of errors to problems."""
