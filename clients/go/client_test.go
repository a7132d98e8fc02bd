package optserve_test

import (
	"context"
	"errors"
	"math"
	"math/rand"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	optserve "optserve.dev/client"
)

// Tests against a real `optserve serve` whose URL is in OPTSERVE_URL (tests/test_go_client.py
// starts one on a real Valkey and runs `go test`); skipped without it.

func serverURL(t *testing.T) string {
	t.Helper()
	u := os.Getenv("OPTSERVE_URL")
	if u == "" {
		t.Skip("OPTSERVE_URL is not set (tests/test_go_client.py runs these against a live server)")
	}
	return u
}

var codecs = []optserve.Codec{optserve.CodecSafetensors, optserve.CodecJSON}

// fast retries keep the tests short; the decisions are the same as with the defaults.
var fast = optserve.RetryPolicy{Attempts: 4, Backoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, Jitter: 0.5}

func newClient(t *testing.T, url string, opts ...optserve.Option) *optserve.Client {
	t.Helper()
	client, err := optserve.NewClient(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return client
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// SGD values whose every product and sum is exact in float32, so p0 - lr*g is the one answer.
var (
	p0 = optserve.NewTensor([]float32{1, 2, -3, 0.5})
	g  = optserve.NewTensor([]float32{0.5, -1, 2, 0.25})
)

const lr = 0.5

func oneStep(p, grad optserve.Tensor, rate float32) optserve.Tensor {
	out := optserve.Tensor{Shape: p.Shape, Data: make([]float32, len(p.Data))}
	for i := range p.Data {
		out.Data[i] = p.Data[i] - rate*grad.Data[i]
	}
	return out
}

func same(a, b optserve.Tensor) bool {
	if len(a.Shape) != len(b.Shape) || len(a.Data) != len(b.Data) {
		return false
	}
	for i := range a.Shape {
		if a.Shape[i] != b.Shape[i] {
			return false
		}
	}
	for i := range a.Data {
		if math.Float32bits(a.Data[i]) != math.Float32bits(b.Data[i]) {
			return false
		}
	}
	return true
}

func mustSame(t *testing.T, what string, got, want optserve.Tensor) {
	t.Helper()
	if !same(got, want) {
		t.Fatalf("%s: got %v %v, want %v %v", what, got.Shape, got.Data, want.Shape, want.Data)
	}
}

// wantError checks err is an *optserve.Error with this status and code, after one attempt.
func wantError(t *testing.T, err error, status int, code string) *optserve.Error {
	t.Helper()
	var e *optserve.Error
	if !errors.As(err, &e) {
		t.Fatalf("want %d %s, got %T %v", status, code, err, err)
	}
	if e.Status != status || e.Code != code {
		t.Fatalf("want %d %s, got %d %s (%s)", status, code, e.Status, e.Code, e.Detail)
	}
	if e.Problem["code"] != code && e.Code != optserve.CodeTransport && e.Code != optserve.CodeInvalidArgument {
		t.Fatalf("problem document %v", e.Problem)
	}
	return e
}

func sgdSession(t *testing.T, client *optserve.Client, extra func(*optserve.CreateRequest)) *optserve.Session {
	t.Helper()
	req := optserve.CreateRequest{
		Optimizer: map[string]any{"name": "sgd", "lr": lr},
		Params:    map[string]optserve.Tensor{"w": p0},
	}
	if extra != nil {
		extra(&req)
	}
	session, err := client.CreateSession(ctxFor(t), req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = session.Delete(context.Background()) })
	return session
}

// serverVersion reads the version straight from the server, past any proxy.
func serverVersion(t *testing.T, id string) int {
	t.Helper()
	session, err := newClient(t, serverURL(t)).Session(ctxFor(t), id)
	if err != nil {
		t.Fatal(err)
	}
	return session.Version()
}

// -- every method, both codecs ---------------------------------------------------------------------

func TestSessionLifecycle(t *testing.T) {
	url := serverURL(t)
	for _, codec := range codecs {
		t.Run(string(codec), func(t *testing.T) {
			ctx := ctxFor(t)
			client := newClient(t, url, optserve.WithCodec(codec))
			name := "go-lifecycle-" + string(codec)
			session, err := client.CreateSession(ctx, optserve.CreateRequest{
				Optimizer: map[string]any{"name": "sgd", "lr": lr},
				Params:    map[string]optserve.Tensor{"w": p0},
				Tensors:   map[string][]int{"b": {2}},
				Name:      name,
			})
			if err != nil {
				t.Fatal(err)
			}
			if session.ID == "" || session.Version() != 0 {
				t.Fatalf("new session %q at version %d", session.ID, session.Version())
			}

			info, err := session.Info(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if info.ID != session.ID || info.Optimizer["name"] != "sgd" || info.LR != lr ||
				info.Name == nil || *info.Name != name || info.Mode.Type != "async" ||
				len(info.Tensors["w"].Shape) != 1 || info.Tensors["b"].Shape[0] != 2 || info.Raw["created_at"] == nil {
				t.Fatalf("info %+v", info)
			}

			joined, err := client.Session(ctx, session.ID)
			if err != nil || joined.ID != session.ID {
				t.Fatalf("join: %v", err)
			}

			result, err := session.Push(ctx, map[string]optserve.Tensor{"w": g})
			if err != nil {
				t.Fatal(err)
			}
			if result.Version != 1 || !result.Applied || result.Replayed || result.Attempts != 1 || result.IdempotencyKey == "" {
				t.Fatalf("push %+v", result)
			}
			mustSame(t, "pushed w", result.Params["w"], oneStep(p0, g, lr))
			mustSame(t, "untouched b", result.Params["b"], optserve.Zeros(2))
			if session.Version() != 1 || session.LastPush() != result {
				t.Fatal("the handle did not record the push")
			}

			only, err := session.Push(ctx, map[string]optserve.Tensor{"w": g}, optserve.PushOptions{Returning: optserve.ReturnPushed})
			if err != nil || len(only.Params) != 1 || only.Version != 2 {
				t.Fatalf("returning pushed: %+v %v", only, err)
			}
			none, err := session.Push(ctx, map[string]optserve.Tensor{"w": g}, optserve.PushOptions{Returning: optserve.ReturnNone})
			if err != nil || len(none.Params) != 0 || none.Version != 3 {
				t.Fatalf("returning none: %+v %v", none, err)
			}
			expected := oneStep(oneStep(oneStep(p0, g, lr), g, lr), g, lr)

			pulled, err := session.Pull(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if pulled.Version != 3 || pulled.TimedOut || len(pulled.Params) != 2 {
				t.Fatalf("pull %+v", pulled)
			}
			mustSame(t, "pulled w", pulled.Params["w"], expected)
			some, err := session.Pull(ctx, []string{"w"})
			if err != nil || len(some.Params) != 1 {
				t.Fatalf("pull w: %+v %v", some, err)
			}

			version, err := session.PutParams(ctx, map[string]optserve.Tensor{"w": p0}, optserve.Int(3))
			if err != nil || version != 4 || session.Version() != 4 {
				t.Fatalf("put params: %d %v", version, err)
			}
			_, err = session.PutParams(ctx, map[string]optserve.Tensor{"w": p0}, optserve.Int(3))
			wantError(t, err, 412, "precondition_failed")
			if version, err = session.PutParams(ctx, map[string]optserve.Tensor{"b": optserve.NewTensor([]float32{1, 2})}, nil); err != nil || version != 5 {
				t.Fatalf("unconditional put: %d %v", version, err)
			}

			updated, err := session.Update(ctx, optserve.SessionUpdate{
				Optimizer: map[string]any{"lr": 0.25}, ClipGradNorm: optserve.Float(10), Name: optserve.String(""),
			})
			if err != nil {
				t.Fatal(err)
			}
			if updated.LR != 0.25 || updated.Optimizer["lr"] != 0.25 || updated.Name != nil ||
				updated.ClipGradNorm == nil || *updated.ClipGradNorm != 10 {
				t.Fatalf("update %+v", updated)
			}
			updated, err = session.Update(ctx, optserve.SessionUpdate{ClipGradNorm: optserve.Float(0)})
			if err != nil || updated.ClipGradNorm != nil {
				t.Fatalf("clipping off: %+v %v", updated, err)
			}
			_, err = session.Update(ctx, optserve.SessionUpdate{Optimizer: map[string]any{"lr": -1}})
			e := wantError(t, err, 422, "invalid_hyperparameter")
			if e.Attempts != 1 || e.Problem["field"] == nil {
				t.Fatalf("problem %v after %d attempts", e.Problem, e.Attempts)
			}
			after, err := session.Push(ctx, map[string]optserve.Tensor{"w": g})
			if err != nil {
				t.Fatal(err)
			}
			mustSame(t, "w at the new lr", after.Params["w"], oneStep(p0, g, 0.25))

			all, err := client.ListSessions(ctx)
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, s := range all {
				found = found || s.ID == session.ID
			}
			if !found {
				t.Fatalf("%s not among %d sessions", session.ID, len(all))
			}
			page, err := client.ListSessions(ctx, optserve.ListOptions{Limit: 1})
			if err != nil || len(page) != 1 {
				t.Fatalf("one page: %d %v", len(page), err)
			}

			if err := session.Delete(ctx); err != nil {
				t.Fatal(err)
			}
			_, err = session.Info(ctx)
			wantError(t, err, 404, "session_not_found")
			_, err = client.Session(ctx, session.ID)
			wantError(t, err, 404, "session_not_found")
			e = wantError(t, session.Delete(ctx), 404, "session_not_found")
			if e.Attempts != 1 {
				t.Fatalf("a first attempt's 404 took %d attempts", e.Attempts)
			}
		})
	}
}

// TTLS: set at create, shown in the view, changed, cleared (a pointer to 0), and left alone by
// an update that does not name it.
func TestSessionTTL(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	client := newClient(t, url)
	ttl := func(info *optserve.SessionInfo) any {
		if info.TTLS == nil {
			return nil
		}
		return *info.TTLS
	}
	session := sgdSession(t, client, func(req *optserve.CreateRequest) { req.TTLS = 600 })
	info, err := session.Info(ctx)
	if err != nil || ttl(info) != 600.0 || info.Raw["ttl_s"] != 600.0 {
		t.Fatalf("created with 600: %+v %v", info, err)
	}
	updated, err := session.Update(ctx, optserve.SessionUpdate{TTLS: optserve.Float(30.5)})
	if err != nil || ttl(updated) != 30.5 {
		t.Fatalf("changed to 30.5: %+v %v", updated, err)
	}
	updated, err = session.Update(ctx, optserve.SessionUpdate{Optimizer: map[string]any{"lr": 0.2}})
	if err != nil || ttl(updated) != 30.5 {
		t.Fatalf("an update without TTLS changed it: %+v %v", updated, err)
	}
	updated, err = session.Update(ctx, optserve.SessionUpdate{TTLS: optserve.Float(0)})
	if err != nil || ttl(updated) != nil {
		t.Fatalf("cleared: %+v %v", updated, err)
	}
	_, err = session.Update(ctx, optserve.SessionUpdate{TTLS: optserve.Float(0.01)}) // below the minimum
	wantError(t, err, 422, "invalid_session")
	if info, err = session.Info(ctx); err != nil || ttl(info) != nil || info.Raw["ttl_s"] != nil {
		t.Fatalf("after the refused update: %+v %v", info, err)
	}
	never := sgdSession(t, client, nil)
	if info, err = never.Info(ctx); err != nil || ttl(info) != nil {
		t.Fatalf("created without TTLS: %+v %v", info, err)
	}
}

func TestStateRoundTrip(t *testing.T) {
	url := serverURL(t)
	for _, codec := range codecs {
		t.Run(string(codec), func(t *testing.T) {
			ctx := ctxFor(t)
			client := newClient(t, url, optserve.WithCodec(codec))
			rng := rand.New(rand.NewSource(3))
			random := func(n int) []float32 {
				out := make([]float32, n)
				for i := range out {
					out[i] = float32(rng.NormFloat64())
				}
				return out
			}
			create := func() *optserve.Session {
				session, err := client.CreateSession(ctx, optserve.CreateRequest{
					Optimizer:  map[string]any{"name": "adam", "lr": 0.01, "betas": []float64{0.8, 0.99}},
					Params:     map[string]optserve.Tensor{"w": optserve.NewTensor(random(6), 2, 3), "v/x": optserve.NewTensor(random(4))},
					LRSchedule: map[string]any{"type": "step", "step_size": 2, "gamma": 0.5},
				})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = session.Delete(context.Background()) })
				return session
			}
			source := create()
			for i := 0; i < 3; i++ {
				grads := map[string]optserve.Tensor{"w": optserve.NewTensor(random(6), 2, 3), "v/x": optserve.NewTensor(random(4))}
				if _, err := source.Push(ctx, grads); err != nil {
					t.Fatal(err)
				}
			}
			state, err := source.State(ctx)
			if err != nil {
				t.Fatal(err)
			}
			w := state.Tensors["w"]
			if state.Version != 3 || state.Optimizer["name"] != "adam" || state.LRSchedule["type"] != "step" ||
				state.LRScheduleState == nil || w.Scalars["step"] != 3 || len(w.Arrays) != 3 ||
				w.Arrays["exp_avg"].Len() != 6 || state.Tensors["v/x"].Arrays["exp_avg_sq"].Len() != 4 {
				t.Fatalf("state %+v", state)
			}

			target := create()
			_, err = target.LoadState(ctx, state, optserve.Int(5))
			wantError(t, err, 412, "precondition_failed")
			version, err := target.LoadState(ctx, state, optserve.Int(0))
			if err != nil || version != 1 {
				t.Fatalf("load state: %d %v", version, err)
			}
			loaded, err := target.State(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for name, entry := range state.Tensors {
				for key, array := range entry.Arrays {
					mustSame(t, name+"/"+key, loaded.Tensors[name].Arrays[key], array)
				}
				if loaded.Tensors[name].Scalars["step"] != entry.Scalars["step"] {
					t.Fatalf("%s step %v", name, loaded.Tensors[name].Scalars)
				}
			}
			// The same next push on both gives the very same params: the whole state moved.
			grads := map[string]optserve.Tensor{"w": optserve.NewTensor(random(6), 2, 3), "v/x": optserve.NewTensor(random(4))}
			a, err := source.Push(ctx, grads)
			if err != nil {
				t.Fatal(err)
			}
			b, err := target.Push(ctx, grads)
			if err != nil {
				t.Fatal(err)
			}
			for name := range grads {
				mustSame(t, "after restore "+name, b.Params[name], a.Params[name])
			}
		})
	}
}

// Both codecs give bit-identical params, and JSON carries awkward float32s exactly both ways.
func TestCodecsAgreeBitForBit(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	awkward := []float32{
		math.Float32frombits(0x15ae43fd), -math.Float32frombits(0x15ae43fd), math.Float32frombits(1),
		math.MaxFloat32, float32(math.Copysign(0, -1)), 0.1, 1.0 / 3, 16777217,
	}
	var results []*optserve.PushResult
	for _, codec := range codecs {
		client := newClient(t, url, optserve.WithCodec(codec))
		session, err := client.CreateSession(ctx, optserve.CreateRequest{
			Optimizer: map[string]any{"name": "adamw", "lr": 0.003, "weight_decay": 0.1},
			Params:    map[string]optserve.Tensor{"w": optserve.NewTensor(awkward)},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = session.Delete(context.Background()) })
		pulled, err := session.Pull(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		mustSame(t, string(codec)+" initial params", pulled.Params["w"], optserve.NewTensor(awkward))
		var last *optserve.PushResult
		for i := 0; i < 5; i++ {
			grad := make([]float32, len(awkward))
			for j := range grad {
				grad[j] = float32(math.Sin(float64(i*len(grad)+j))) * 1e-3
			}
			if last, err = session.Push(ctx, map[string]optserve.Tensor{"w": optserve.NewTensor(grad)}); err != nil {
				t.Fatal(err)
			}
		}
		results = append(results, last)
	}
	mustSame(t, "json vs safetensors", results[1].Params["w"], results[0].Params["w"])
}

func TestNonFinite(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	nan := optserve.NewTensor([]float32{float32(math.NaN()), 1, 2, 3})

	client := newClient(t, url)
	session := sgdSession(t, client, nil)
	_, err := session.Push(ctx, map[string]optserve.Tensor{"w": nan})
	wantError(t, err, 422, "non_finite")

	skipping := sgdSession(t, client, func(r *optserve.CreateRequest) { r.Nonfinite = "skip" })
	result, err := skipping.Push(ctx, map[string]optserve.Tensor{"w": nan})
	if err != nil || result.Applied || result.Skipped == "" {
		t.Fatalf("skip: %+v %v", result, err)
	}
	mustSame(t, "skipped w", result.Params["w"], p0)

	// JSON has no NaN: refused before sending.
	proxy := startProxy(t, url)
	jsonClient := newClient(t, proxy.URL, optserve.WithCodec(optserve.CodecJSON))
	joined, err := jsonClient.Session(ctx, session.ID)
	if err != nil {
		t.Fatal(err)
	}
	_, err = joined.Push(ctx, map[string]optserve.Tensor{"w": nan})
	wantError(t, err, 0, optserve.CodeInvalidArgument)
	_, err = joined.Push(ctx, map[string]optserve.Tensor{"w": {Shape: []int{3}, Data: []float32{1}}})
	wantError(t, err, 0, optserve.CodeInvalidArgument)
	if n := len(proxy.seen("POST", "/gradients")); n != 0 {
		t.Fatalf("%d pushes reached the proxy", n)
	}
}

// -- errors -------------------------------------------------------------------------------------------

func TestErrors(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	client := newClient(t, url)

	_, err := client.Session(ctx, "no-such-session")
	e := wantError(t, err, 404, "session_not_found")
	if e.Attempts != 1 || optserve.ErrorCode(err) != "session_not_found" || !strings.Contains(e.Error(), "404 session_not_found") {
		t.Fatalf("%v, %d attempts", e, e.Attempts)
	}
	_, err = client.CreateSession(ctx, optserve.CreateRequest{Optimizer: map[string]any{"name": "adamx"}, Params: map[string]optserve.Tensor{"w": p0}})
	wantError(t, err, 422, "unknown_optimizer")
	_, err = client.CreateSession(ctx, optserve.CreateRequest{Optimizer: map[string]any{"name": "adam", "lr": -1}, Params: map[string]optserve.Tensor{"w": p0}})
	e = wantError(t, err, 422, "invalid_hyperparameter")
	if e.Problem["field"] != "lr" {
		t.Fatalf("problem %v", e.Problem)
	}

	session := sgdSession(t, client, nil)
	_, err = session.Push(ctx, map[string]optserve.Tensor{"nope": g})
	wantError(t, err, 422, "unknown_tensor")
	_, err = session.Push(ctx, map[string]optserve.Tensor{"w": optserve.NewTensor([]float32{1, 2})})
	wantError(t, err, 422, "shape_mismatch")
	_, err = session.Push(ctx, map[string]optserve.Tensor{"w": g}, optserve.PushOptions{IdempotencyKey: strings.Repeat("k", 300)})
	wantError(t, err, 422, "invalid_session")
	if v := serverVersion(t, session.ID); v != 0 {
		t.Fatalf("failed pushes moved the version to %d", v)
	}

	// Nothing listening: a transport error (after the retries), with the cause underneath.
	dead := newProxy(t, url) // reserved, never started
	_, err = newClient(t, dead.URL, optserve.WithRetries(optserve.RetryPolicy{Attempts: 2})).Session(ctx, session.ID)
	e = wantError(t, err, 0, optserve.CodeTransport)
	var opErr *net.OpError
	if e.Attempts != 2 || !errors.As(err, &opErr) {
		t.Fatalf("%v after %d attempts", err, e.Attempts)
	}

	if _, err := optserve.NewClient("localhost:8000"); err == nil {
		t.Fatal("a URL without a scheme was accepted")
	}
	if _, err := optserve.NewClient(url, optserve.WithCodec("msgpack")); err == nil {
		t.Fatal("an unknown codec was accepted")
	}
}

// -- many workers: base_version, idempotency keys, retries ------------------------------------------

func TestBaseVersionIsSentFromTheLastVersionSeen(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	client := newClient(t, url)
	a := sgdSession(t, client, func(r *optserve.CreateRequest) { r.MaxStaleness = optserve.Int(0) })
	b, err := client.Session(ctx, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if first, err := a.Push(ctx, map[string]optserve.Tensor{"w": g}); err != nil || first.Staleness == nil || *first.Staleness != 0 {
		t.Fatalf("first push: %+v %v", first, err)
	}
	_, err = b.Push(ctx, map[string]optserve.Tensor{"w": g}) // b saw version 0
	e := wantError(t, err, 409, "stale_gradient")
	if e.Problem["version"] != float64(1) {
		t.Fatalf("problem %v", e.Problem)
	}
	if _, err := b.Pull(ctx, []string{"w"}); err != nil || b.Version() != 1 {
		t.Fatalf("pull: %v, version %d", err, b.Version())
	}
	second, err := b.Push(ctx, map[string]optserve.Tensor{"w": g})
	if err != nil || second.Version != 2 {
		t.Fatalf("push after pull: %+v %v", second, err)
	}
	_, err = a.Push(ctx, map[string]optserve.Tensor{"w": g}, optserve.PushOptions{BaseVersion: optserve.Int(1)})
	wantError(t, err, 409, "stale_gradient")
	unchecked, err := a.Push(ctx, map[string]optserve.Tensor{"w": g}, optserve.PushOptions{NoBaseVersion: true})
	if err != nil || unchecked.Version != 3 || unchecked.Staleness != nil {
		t.Fatalf("no base_version: %+v %v", unchecked, err)
	}
}

func TestLostPushAnswerIsRetriedWithTheSameKeyAndAppliedOnce(t *testing.T) {
	url := serverURL(t)
	for name, act := range map[string]action{"close": dropClose, "reset": dropReset} {
		t.Run(name, func(t *testing.T) {
			ctx := ctxFor(t)
			proxy := startProxy(t, url)
			proxy.on(isPush, act)
			client := newClient(t, proxy.URL, optserve.WithRetries(fast))
			session := sgdSession(t, client, nil)
			result, err := session.Push(ctx, map[string]optserve.Tensor{"w": g})
			if err != nil {
				t.Fatal(err)
			}
			pushes := proxy.seen("POST", "/gradients")
			if len(pushes) != 2 {
				t.Fatalf("%d pushes reached the server", len(pushes))
			}
			key := pushes[0].Header.Get("Idempotency-Key")
			if key == "" || pushes[1].Header.Get("Idempotency-Key") != key || key != result.IdempotencyKey {
				t.Fatalf("keys %q %q (result %q)", key, pushes[1].Header.Get("Idempotency-Key"), result.IdempotencyKey)
			}
			if string(pushes[0].Body) != string(pushes[1].Body) {
				t.Fatal("the retry sent another body")
			}
			if !result.Replayed || !result.Applied || result.Version != 1 || result.Attempts != 2 || session.Version() != 1 {
				t.Fatalf("result %+v", result)
			}
			mustSame(t, "w", result.Params["w"], oneStep(p0, g, lr))
			if v := serverVersion(t, session.ID); v != 1 {
				t.Fatalf("the server is at version %d: the push was applied twice", v)
			}
		})
	}
}

func TestRetriesCanBeTurnedOff(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	proxy.on(isPush, dropClose)
	client := newClient(t, proxy.URL, optserve.WithoutRetries())
	session := sgdSession(t, client, nil)
	// A pooled connection: net/http must not re-send the keyed push on its own either.
	_, err := session.Push(ctx, map[string]optserve.Tensor{"w": g})
	e := wantError(t, err, 0, optserve.CodeTransport)
	if e.Attempts != 1 || len(proxy.seen("POST", "/gradients")) != 1 {
		t.Fatalf("%d attempts, %d pushes", e.Attempts, len(proxy.seen("POST", "/gradients")))
	}
	if v := serverVersion(t, session.ID); v != 1 {
		t.Fatalf("version %d: the lost push was applied", v)
	}
}

func TestEveryPushHasItsOwnKey(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	client := newClient(t, proxy.URL, optserve.WithRetries(fast))
	session := sgdSession(t, client, nil)
	grads := map[string]optserve.Tensor{"w": g}
	for i := 0; i < 2; i++ {
		if _, err := session.Push(ctx, grads); err != nil {
			t.Fatal(err)
		}
	}
	// A key of one's own, reused: the body must be the same (base_version included).
	mine := optserve.PushOptions{IdempotencyKey: "mine-1", BaseVersion: optserve.Int(2)}
	if _, err := session.Push(ctx, grads, mine); err != nil {
		t.Fatal(err)
	}
	replay, err := session.Push(ctx, grads, mine)
	if err != nil || !replay.Replayed || replay.Version != 3 {
		t.Fatalf("replay %+v %v", replay, err)
	}
	_, err = session.Push(ctx, grads, optserve.PushOptions{IdempotencyKey: "mine-1"}) // base_version 3
	wantError(t, err, 422, "idempotency_key_reused")
	var keys []string
	for _, r := range proxy.seen("POST", "/gradients") {
		keys = append(keys, r.Header.Get("Idempotency-Key"))
	}
	if len(keys) != 5 || keys[0] == keys[1] || keys[2] != "mine-1" || keys[3] != "mine-1" || keys[4] != "mine-1" {
		t.Fatalf("keys %q", keys)
	}
	if session.Version() != 3 || serverVersion(t, session.ID) != 3 {
		t.Fatal("the replay applied something")
	}
}

func TestCreateIsNotResentOnceItMayHaveArrived(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	proxy.on(func(r seenRequest) bool { return r.Method == "POST" && r.Path == "/v1/sessions" }, dropClose)
	name := "go-maybe-made-" + time.Now().Format("150405.000000")
	_, err := newClient(t, proxy.URL, optserve.WithRetries(fast)).CreateSession(ctx, optserve.CreateRequest{
		Optimizer: map[string]any{"name": "sgd"}, Params: map[string]optserve.Tensor{"w": p0}, Name: name,
	})
	if e := wantError(t, err, 0, optserve.CodeTransport); e.Attempts != 1 {
		t.Fatalf("%d attempts", e.Attempts)
	}
	if n := len(proxy.seen("POST", "/v1/sessions")); n != 1 {
		t.Fatalf("the create was sent %d times", n)
	}
	all, err := newClient(t, url).ListSessions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	made := 0
	for _, s := range all {
		if s.Name != nil && *s.Name == name {
			made++
			session, _ := newClient(t, url).Session(ctx, s.ID)
			_ = session.Delete(ctx)
		}
	}
	if made != 1 {
		t.Fatalf("%d sessions named %s", made, name)
	}
}

func TestConnectionRefusedIsRetriedUntilTheServerListens(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	late := newProxy(t, url)
	timer := time.AfterFunc(500*time.Millisecond, func() {
		if err := late.start(); err != nil {
			t.Error(err)
		}
	})
	defer timer.Stop()
	policy := optserve.RetryPolicy{Attempts: 40, Backoff: 20 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	client := newClient(t, late.URL, optserve.WithRetries(policy))
	started := time.Now()
	session := sgdSession(t, client, nil) // a refused connection never reached the server
	if time.Since(started) < 400*time.Millisecond {
		t.Fatal("the create did not wait for the server")
	}
	result, err := session.Push(ctx, map[string]optserve.Tensor{"w": g})
	if err != nil {
		t.Fatal(err)
	}
	mustSame(t, "w", result.Params["w"], oneStep(p0, g, lr))
	if len(late.seen("POST", "/v1/sessions")) != 1 || len(late.seen("POST", "/gradients")) != 1 {
		t.Fatal("a request was sent twice")
	}
}

func TestLostDeleteAnswerCountsAsDeleted(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	proxy.on(func(r seenRequest) bool { return r.Method == "DELETE" }, dropClose)
	client := newClient(t, proxy.URL, optserve.WithRetries(fast))
	session := sgdSession(t, client, nil)
	if err := session.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(proxy.seen("DELETE", "")); n != 2 {
		t.Fatalf("%d deletes", n)
	}
	e := wantError(t, session.Delete(ctx), 404, "session_not_found")
	if e.Attempts != 1 {
		t.Fatalf("%d attempts", e.Attempts)
	}
}

func Test503IsRetriedAfterRetryAfter(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	policy := optserve.RetryPolicy{Attempts: 3, Backoff: 10 * time.Millisecond, MaxBackoff: 2 * time.Second}
	client := newClient(t, proxy.URL, optserve.WithRetries(policy))
	session := sgdSession(t, client, nil)

	proxy.on(isPush, gateway503)
	started := time.Now()
	result, err := session.Push(ctx, map[string]optserve.Tensor{"w": g})
	if err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(started); waited < 900*time.Millisecond {
		t.Fatalf("retried after %v, before Retry-After: 1", waited)
	}
	pushes := proxy.seen("POST", "/gradients")
	if result.Attempts != 2 || result.Version != 1 || len(pushes) != 2 ||
		pushes[0].Header.Get("Idempotency-Key") != pushes[1].Header.Get("Idempotency-Key") {
		t.Fatalf("result %+v after %d pushes", result, len(pushes))
	}

	// Retry-After is capped by MaxBackoff.
	capped := newClient(t, proxy.URL, optserve.WithRetries(fast))
	proxy.on(func(r seenRequest) bool { return r.Method == "GET" && strings.HasSuffix(r.Path, "/params") }, gateway503)
	joined, err := capped.Session(ctx, session.ID)
	if err != nil {
		t.Fatal(err)
	}
	started = time.Now()
	if _, err := joined.Pull(ctx, nil); err != nil || time.Since(started) > 800*time.Millisecond {
		t.Fatalf("capped wait: %v after %v", err, time.Since(started))
	}

	// A 503 to a create may have made the session after all: not retried.
	proxy.on(func(r seenRequest) bool { return r.Method == "POST" && r.Path == "/v1/sessions" }, gateway503)
	before := len(proxy.seen("POST", "/v1/sessions"))
	_, err = client.CreateSession(ctx, optserve.CreateRequest{Optimizer: map[string]any{"name": "sgd"}, Params: map[string]optserve.Tensor{"w": p0}})
	if e := wantError(t, err, 503, "store_unavailable"); e.Attempts != 1 || len(proxy.seen("POST", "/v1/sessions")) != before+1 {
		t.Fatalf("create retried after a 503: %d attempts", e.Attempts)
	}
}

func TestNoRetryOnClientErrors(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	proxy := startProxy(t, url)
	client := newClient(t, proxy.URL, optserve.WithRetries(fast))
	session := sgdSession(t, client, func(r *optserve.CreateRequest) { r.MaxStaleness = optserve.Int(0) })
	other, err := client.Session(ctx, session.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := session.Push(ctx, map[string]optserve.Tensor{"w": g}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		call           func() error
		status         int
		code           string
		method, suffix string
	}{
		{func() error { _, err := session.Push(ctx, map[string]optserve.Tensor{"nope": g}); return err },
			422, "unknown_tensor", "POST", "/gradients"},
		{func() error { _, err := other.Push(ctx, map[string]optserve.Tensor{"w": g}); return err },
			409, "stale_gradient", "POST", "/gradients"},
		{func() error {
			_, err := session.PutParams(ctx, map[string]optserve.Tensor{"w": p0}, optserve.Int(9))
			return err
		}, 412, "precondition_failed", "PUT", "/params"},
		{func() error { _, err := client.Session(ctx, "no-such-session"); return err },
			404, "session_not_found", "GET", "/no-such-session"},
		{func() error {
			_, err := client.CreateSession(ctx, optserve.CreateRequest{Optimizer: map[string]any{"name": "adamx"}})
			return err
		}, 422, "unknown_optimizer", "POST", "/v1/sessions"},
		{func() error {
			_, err := session.Update(ctx, optserve.SessionUpdate{Optimizer: map[string]any{"momentum": -3}})
			return err
		}, 422, "invalid_hyperparameter", "PATCH", session.ID},
	}
	for _, c := range cases {
		before := len(proxy.seen(c.method, c.suffix))
		e := wantError(t, c.call(), c.status, c.code)
		if e.Attempts != 1 || len(proxy.seen(c.method, c.suffix)) != before+1 {
			t.Fatalf("%s: %d attempts, %d requests", c.code, e.Attempts, len(proxy.seen(c.method, c.suffix))-before)
		}
	}
}

func TestAPIKeyAndUserAgent(t *testing.T) {
	url := serverURL(t)
	proxy := startProxy(t, url)
	client := newClient(t, proxy.URL, optserve.WithAPIKey("secret-k"))
	if _, err := client.ListSessions(ctxFor(t), optserve.ListOptions{Limit: 1}); err != nil {
		t.Fatal(err)
	}
	seen := proxy.seen("GET", "/v1/sessions")
	if len(seen) != 1 || seen[0].Header.Get("Authorization") != "Bearer secret-k" ||
		!strings.HasPrefix(seen[0].Header.Get("User-Agent"), "optserve-client-go/") {
		t.Fatalf("headers %v", seen)
	}
}

// -- long poll, cancellation, sync mode --------------------------------------------------------------

func TestLongPoll(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	client := newClient(t, url)
	pusher := sgdSession(t, client, nil)
	waiter, err := client.Session(ctx, pusher.ID)
	if err != nil {
		t.Fatal(err)
	}

	timer := time.AfterFunc(300*time.Millisecond, func() {
		if _, err := pusher.Push(context.Background(), map[string]optserve.Tensor{"w": g}); err != nil {
			t.Error(err)
		}
	})
	defer timer.Stop()
	started := time.Now()
	pulled, err := waiter.Pull(ctx, nil, optserve.PullOptions{Wait: 10 * time.Second})
	waited := time.Since(started)
	if err != nil {
		t.Fatal(err)
	}
	if pulled.Version != 1 || pulled.TimedOut || waited < 250*time.Millisecond || waited > 5*time.Second {
		t.Fatalf("pulled version %d (timed out %v) after %v", pulled.Version, pulled.TimedOut, waited)
	}
	mustSame(t, "w after the push", pulled.Params["w"], oneStep(p0, g, lr))

	// Nothing newer by the deadline: 304, then the current params.
	started = time.Now()
	pulled, err = waiter.Pull(ctx, []string{"w"}, optserve.PullOptions{Wait: 400 * time.Millisecond})
	waited = time.Since(started)
	if err != nil || !pulled.TimedOut || pulled.Version != 1 || waited < 350*time.Millisecond || len(pulled.Params) != 1 {
		t.Fatalf("timed-out poll %+v %v after %v", pulled, err, waited)
	}
	// An AfterVersion already passed answers at once.
	started = time.Now()
	pulled, err = waiter.Pull(ctx, nil, optserve.PullOptions{AfterVersion: optserve.Int(0), Wait: 10 * time.Second})
	if err != nil || pulled.Version != 1 || pulled.TimedOut || time.Since(started) > 2*time.Second {
		t.Fatalf("passed version: %+v %v", pulled, err)
	}

	// The caller's context ends a long poll at once, and shows through the error.
	cancelled, cancel := context.WithCancel(ctx)
	time.AfterFunc(200*time.Millisecond, cancel)
	started = time.Now()
	_, err = waiter.Pull(cancelled, nil, optserve.PullOptions{Wait: 10 * time.Second})
	wantError(t, err, 0, optserve.CodeTransport)
	if !errors.Is(err, context.Canceled) || time.Since(started) > 3*time.Second {
		t.Fatalf("cancelled poll: %v after %v", err, time.Since(started))
	}
}

func TestSyncModeRound(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	client := newClient(t, url)
	session := sgdSession(t, client, func(r *optserve.CreateRequest) {
		r.Mode = &optserve.Mode{Type: "sync", Workers: 2, TimeoutS: 20}
	})
	info, err := session.Info(ctx)
	if err != nil || info.Mode.Type != "sync" || info.Mode.Workers != 2 || info.Mode.MinWorkers != 2 {
		t.Fatalf("mode %+v %v", info, err)
	}
	three := optserve.NewTensor([]float32{1.5, -3, 6, 0.75}) // mean(g, 3g) = 2g
	for i := range three.Data {
		three.Data[i] = 3 * g.Data[i]
	}
	var wg sync.WaitGroup
	results := make([]*optserve.PushResult, 2)
	errs := make([]error, 2)
	for i, grad := range []optserve.Tensor{g, three} {
		wg.Add(1)
		go func(i int, grad optserve.Tensor) {
			defer wg.Done()
			worker := []string{"a", "b"}[i]
			results[i], errs[i] = session.Push(ctx, map[string]optserve.Tensor{"w": grad}, optserve.PushOptions{Worker: worker})
		}(i, grad)
	}
	wg.Wait()
	for i := range results {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		r := results[i]
		if r.Version != 1 || r.Round == nil || r.RoundWorkers == nil || *r.RoundWorkers != 2 {
			t.Fatalf("worker %d: %+v", i, r)
		}
		mustSame(t, "one step on the mean", r.Params["w"], oneStep(p0, g, 2*lr))
	}
}

// Many goroutines share one client and one session handle: every push lands exactly once.
func TestConcurrentPushesShareOneHandle(t *testing.T) {
	url := serverURL(t)
	ctx := ctxFor(t)
	client := newClient(t, url)
	session := sgdSession(t, client, nil)
	const workers, each = 8, 5
	var wg sync.WaitGroup
	var mu sync.Mutex
	var versions []int
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				r, err := session.Push(ctx, map[string]optserve.Tensor{"w": g}, optserve.PushOptions{NoBaseVersion: true, Returning: optserve.ReturnNone})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				versions = append(versions, r.Version)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	sort.Ints(versions)
	for i, v := range versions {
		if v != i+1 {
			t.Fatalf("versions %v", versions)
		}
	}
	if session.Version() != workers*each {
		t.Fatalf("handle at %d", session.Version())
	}
	pulled, err := session.Pull(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := p0
	for i := 0; i < workers*each; i++ {
		want = oneStep(want, g, lr)
	}
	mustSame(t, "w after every push", pulled.Params["w"], want)
}
