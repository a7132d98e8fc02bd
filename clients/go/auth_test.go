package optserve_test

import (
	"os"
	"strings"
	"testing"
	"time"

	optserve "optserve.dev/client"
)

// A 429 means the server refused before doing anything, so even a create is retried, after
// Retry-After; with no retries left it surfaces as a 429 "rate_limited" error.
func Test429IsRetriedEvenForCreate(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	policy := optserve.RetryPolicy{Attempts: 3, Backoff: 10 * time.Millisecond, MaxBackoff: 2 * time.Second}
	client := newClient(t, proxy.URL, optserve.WithRetries(policy))
	isCreate := func(r seenRequest) bool { return r.Method == "POST" && r.Path == "/v1/sessions" }

	proxy.on(isCreate, gateway429)
	started := time.Now()
	session := sgdSession(t, client, nil)
	if waited := time.Since(started); waited < 900*time.Millisecond {
		t.Fatalf("retried after %v, before Retry-After: 1", waited)
	}
	if len(proxy.seen("POST", "/v1/sessions")) != 2 || session.ID == "" {
		t.Fatalf("%d creates", len(proxy.seen("POST", "/v1/sessions")))
	}

	once := newClient(t, proxy.URL, optserve.WithRetries(optserve.RetryPolicy{Attempts: 1}))
	proxy.on(func(r seenRequest) bool { return r.Method == "GET" && r.Path == "/v1/sessions" }, gateway429)
	_, err := once.ListSessions(ctx, optserve.ListOptions{Limit: 1})
	if e := wantError(t, err, 429, "rate_limited"); e.Attempts != 1 {
		t.Fatalf("%d attempts", e.Attempts)
	}
}

// Against a server that needs keys (OPTSERVE_AUTH_URL, a key of it in OPTSERVE_AUTH_KEY): the
// key is accepted, and a missing or wrong one is a 401 "unauthorized" error.
func TestAPIKeyOnAServerThatNeedsOne(t *testing.T) {
	url, key := os.Getenv("OPTSERVE_AUTH_URL"), os.Getenv("OPTSERVE_AUTH_KEY")
	if url == "" || key == "" {
		t.Skip("OPTSERVE_AUTH_URL / OPTSERVE_AUTH_KEY are not set (tests/test_go_client.py sets them)")
	}
	ctx := ctxFor(t)
	keyed := newClient(t, url, optserve.WithAPIKey(key))
	session := sgdSession(t, keyed, nil)
	if _, err := keyed.Session(ctx, session.ID); err != nil {
		t.Fatal(err)
	}
	for _, wrong := range []string{"", "not-the-key-0123456789"} {
		opts := []optserve.Option{}
		if wrong != "" {
			opts = append(opts, optserve.WithAPIKey(wrong))
		}
		_, err := newClient(t, url, opts...).Session(ctx, session.ID)
		if e := wantError(t, err, 401, "unauthorized"); !strings.Contains(e.Error(), "unauthorized") {
			t.Fatalf("error %v", e)
		}
	}
}
