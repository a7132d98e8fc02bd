package optserve

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Session is a handle on one server session: its id, the newest version it has seen and the
// last push's answer. Safe for concurrent use.
type Session struct {
	ID     string
	client *Client

	mu       sync.Mutex
	version  int
	lastPush *PushResult
	// roundWait is a sync-mode session's round timeout: a push may wait that long for its
	// round, on top of the client's per-attempt timeout.
	roundWait time.Duration
}

func newSession(c *Client, info *SessionInfo) *Session {
	s := &Session{ID: info.ID, client: c}
	s.seenInfo(info)
	return s
}

// Client is the client this session talks through.
func (s *Session) Client() *Client { return s.client }

// Version is the newest session version this handle has seen (from a create, join, push, pull,
// put, state or info). Pushes send it as base_version by default.
func (s *Session) Version() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.version
}

// LastPush is the full answer to this handle's last successful push (nil before one).
func (s *Session) LastPush() *PushResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastPush
}

// seen records a version; answers may arrive out of order (concurrent calls, a replayed push)
// and the server's version only grows, so the newest is kept.
func (s *Session) seen(version int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if version > s.version {
		s.version = version
	}
}

func (s *Session) seenInfo(info *SessionInfo) {
	s.seen(info.Version)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.roundWait = 0
	if info.Mode.Type == "sync" && info.Mode.TimeoutS > 0 {
		s.roundWait = time.Duration(info.Mode.TimeoutS * float64(time.Second))
	}
}

func (s *Session) path(suffix string) string { return sessionPath(s.ID, suffix) }

// -- the session resource ---------------------------------------------------------------------------

// Info is the session as the server has it now.
func (s *Session) Info(ctx context.Context) (*SessionInfo, error) {
	info, err := s.client.sessionInfo(ctx, s.ID)
	if err != nil {
		return nil, err
	}
	s.seenInfo(info)
	return info, nil
}

// SessionUpdate changes a session in flight; zero fields are left as they are.
type SessionUpdate struct {
	// Optimizer holds the hyperparameters to change: {"lr": 1e-4}.
	Optimizer map[string]any
	// ClipGradNorm sets the clipping norm; a pointer to 0 turns clipping off.
	ClipGradNorm *float64
	// Nonfinite is "reject" or "skip".
	Nonfinite string
	// MaxStaleness sets the bound; a pointer to a negative number accepts any staleness.
	MaxStaleness *int
	// Staleness is "reject" or "scale".
	Staleness string
	// Name renames the session; a pointer to "" clears the name.
	Name *string
	// TTLS sets the idle expiry in seconds; a pointer to 0 makes the session never expire.
	TTLS *float64
}

// Update changes hyperparameters in flight (PATCH) and returns the session as it now is:
//
//	session.Update(ctx, optserve.SessionUpdate{Optimizer: map[string]any{"lr": 1e-4}})
func (s *Session) Update(ctx context.Context, update SessionUpdate) (*SessionInfo, error) {
	changes := map[string]any{}
	if update.Optimizer != nil {
		changes["optimizer"] = update.Optimizer
	}
	if update.ClipGradNorm != nil {
		if *update.ClipGradNorm == 0 {
			changes["clip_grad_norm"] = nil
		} else {
			changes["clip_grad_norm"] = *update.ClipGradNorm
		}
	}
	if update.Nonfinite != "" {
		changes["nonfinite"] = update.Nonfinite
	}
	if update.MaxStaleness != nil {
		if *update.MaxStaleness < 0 {
			changes["max_staleness"] = nil
		} else {
			changes["max_staleness"] = *update.MaxStaleness
		}
	}
	if update.Staleness != "" {
		changes["staleness"] = update.Staleness
	}
	if update.Name != nil {
		if *update.Name == "" {
			changes["name"] = nil
		} else {
			changes["name"] = *update.Name
		}
	}
	if update.TTLS != nil {
		if *update.TTLS == 0 {
			changes["ttl_s"] = nil
		} else {
			changes["ttl_s"] = *update.TTLS
		}
	}
	body, err := marshalJSON(changes)
	if err != nil {
		return nil, invalidArgument(err.Error())
	}
	resp, err := s.client.do(ctx, &call{
		method: http.MethodPatch, path: s.path(""), body: body, contentType: mediaJSON, accept: mediaJSON,
	})
	if err != nil {
		return nil, err
	}
	var info SessionInfo
	if err := decodeJSON(resp, &info); err != nil {
		return nil, err
	}
	s.seenInfo(&info)
	return &info, nil
}

// Delete deletes the session and all of its state on the server. A retry that finds the session
// gone after an attempt whose answer was lost counts as done (that attempt deleted it).
func (s *Session) Delete(ctx context.Context) error {
	_, err := s.client.do(ctx, &call{
		method: http.MethodDelete, path: s.path(""), accept: mediaJSON, doneStatus: http.StatusNotFound,
	})
	return err
}

// -- tensors ---------------------------------------------------------------------------------------

// Returning says which params a push sends back.
type Returning string

const (
	ReturnAll    Returning = "all"    // every tensor (the default)
	ReturnPushed Returning = "pushed" // only the tensors pushed
	ReturnNone   Returning = "none"   // none
)

// PushOptions tunes one push; the zero value is the usual push.
type PushOptions struct {
	// BaseVersion is the version the gradients were computed from; nil sends the newest version
	// this handle has seen (Version()). The server measures staleness from it.
	BaseVersion *int
	// NoBaseVersion sends no base_version at all (no staleness check).
	NoBaseVersion bool
	// Worker names the pushing worker (sync mode: one push per worker and round).
	Worker string
	// Returning picks the params sent back ("" = ReturnAll).
	Returning Returning
	// IdempotencyKey defaults to a fresh random UUID, sent on every attempt of this push. A key
	// of your own reused by a later push must come with the very same body (base_version too),
	// else the server answers 422 idempotency_key_reused.
	IdempotencyKey string
}

// PushResult is everything a push answered.
type PushResult struct {
	// Version is the session version this push produced (on a replay: the first attempt's).
	Version int
	// Applied is false when the step was skipped (Skipped says why, e.g. a non-finite gradient
	// with nonfinite "skip").
	Applied bool
	Skipped string
	Params  map[string]Tensor
	// TotalNorm is the pre-clip global gradient norm (when clipping is on).
	TotalNorm *float64
	// Staleness is how many versions the push's base_version was behind.
	Staleness *int
	// ParamsVersion is, on a replay, the (current) version of the params returned.
	ParamsVersion *int
	// Round and RoundWorkers: sync mode's round and how many pushes it applied.
	Round        *int
	RoundWorkers *int
	// Replayed: the server answered from its record of an earlier attempt with the same key
	// (Idempotency-Replayed) and applied nothing this time.
	Replayed bool
	// IdempotencyKey is the key the push was sent with, on every attempt.
	IdempotencyKey string
	// Attempts is how many requests the push took.
	Attempts int
	// Fields holds every non-tensor member of the answer as raw JSON.
	Fields map[string]json.RawMessage
}

// Push applies one optimizer step with these gradients (tensors left out are skipped, as torch
// skips grad=None) and returns the updated params. Transport failures and 503s are retried with
// the same Idempotency-Key, so the server applies the push at most once.
func (s *Session) Push(ctx context.Context, grads map[string]Tensor, opts ...PushOptions) (*PushResult, error) {
	var o PushOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	returning := o.Returning
	if returning == "" {
		returning = ReturnAll
	}
	if returning != ReturnAll && returning != ReturnPushed && returning != ReturnNone {
		return nil, invalidArgument(fmt.Sprintf("Returning must be all, pushed or none, not %q", returning))
	}
	fields := map[string]any{}
	if !o.NoBaseVersion {
		base := s.Version() // the newest params this handle has seen
		if o.BaseVersion != nil {
			base = *o.BaseVersion
		}
		if base < 0 {
			return nil, invalidArgument(fmt.Sprintf("BaseVersion must be >= 0, not %d", base))
		}
		fields["base_version"] = base
	}
	if o.Worker != "" {
		fields["worker"] = o.Worker
	}
	if grads == nil {
		grads = map[string]Tensor{}
	}
	body, contentType, err := encodeMessage(s.client.codec, "grads", grads, fields)
	if err != nil {
		return nil, err
	}
	// One key per push, made before the first attempt and sent on every retry of it.
	key := o.IdempotencyKey
	if key == "" {
		key = newIdempotencyKey()
	}
	s.mu.Lock()
	roundWait := s.roundWait
	s.mu.Unlock()
	resp, err := s.client.do(ctx, &call{
		method:      http.MethodPost,
		path:        s.path("/gradients"),
		query:       url.Values{"return": {string(returning)}},
		body:        body,
		contentType: contentType,
		accept:      s.client.accept(),
		header:      http.Header{"Idempotency-Key": {key}},
		extra:       roundWait,
		keyed:       true,
	})
	if err != nil {
		return nil, err
	}
	params, meta, err := decodeMessage(resp.body, resp.header.Get("Content-Type"), "params")
	if err != nil {
		return nil, invalidResponse(resp, err)
	}
	result := &PushResult{
		Params:         params,
		Replayed:       strings.EqualFold(resp.header.Get("Idempotency-Replayed"), "true"),
		IdempotencyKey: key,
		Attempts:       resp.attempts,
		Fields:         meta,
	}
	for _, f := range []struct {
		name string
		out  any
	}{
		{"version", &result.Version}, {"applied", &result.Applied}, {"skipped", &result.Skipped},
		{"total_norm", &result.TotalNorm}, {"staleness", &result.Staleness},
		{"params_version", &result.ParamsVersion}, {"round", &result.Round},
		{"round_workers", &result.RoundWorkers},
	} {
		if err := field(meta, f.name, f.out); err != nil {
			return nil, invalidResponse(resp, err)
		}
	}
	if _, ok := meta["version"]; !ok {
		return nil, invalidResponse(resp, fmt.Errorf("the push response has no version"))
	}
	s.seen(result.Version)
	s.mu.Lock()
	s.lastPush = result
	s.mu.Unlock()
	return result, nil
}

// PullOptions makes a pull a long poll.
type PullOptions struct {
	// AfterVersion: answer once the session's version is above it (default, when Wait > 0:
	// Version(), "anything newer than what I have").
	AfterVersion *int
	// Wait is how long the server may hold the request (capped by OPTSERVE_LONG_POLL_MAX_S).
	Wait time.Duration
}

// Pulled is a pull's answer.
type Pulled struct {
	Version int
	Params  map[string]Tensor
	// TimedOut: the long poll's deadline passed with nothing newer than AfterVersion (the server
	// answered 304); Params are then the current ones, fetched right after.
	TimedOut bool
}

// Pull fetches the current params (names nil: all of them). With a Wait it is a long poll: the
// server answers as soon as the version passes AfterVersion, woken by the commit.
func (s *Session) Pull(ctx context.Context, names []string, opts ...PullOptions) (*Pulled, error) {
	var o PullOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	query := url.Values{}
	if names != nil {
		query.Set("names", strings.Join(names, ","))
	}
	after := o.AfterVersion
	if o.Wait > 0 && after == nil {
		after = Int(s.Version())
	}
	if after != nil {
		query.Set("after_version", strconv.Itoa(*after))
		if o.Wait > 0 {
			query.Set("wait_s", strconv.FormatFloat(o.Wait.Seconds(), 'f', -1, 64))
		}
	}
	resp, err := s.client.do(ctx, &call{
		method: http.MethodGet, path: s.path("/params"), query: query,
		accept: s.client.accept(), extra: o.Wait,
	})
	if err != nil {
		return nil, err
	}
	if resp.status == http.StatusNotModified { // the deadline: nothing newer arrived
		if version, err := parseETag(resp.header.Get("ETag")); err == nil {
			s.seen(version)
		}
		pulled, err := s.Pull(ctx, names)
		if err != nil {
			return nil, err
		}
		pulled.TimedOut = true
		return pulled, nil
	}
	params, meta, err := decodeMessage(resp.body, resp.header.Get("Content-Type"), "params")
	if err != nil {
		return nil, invalidResponse(resp, err)
	}
	pulled := &Pulled{Params: params}
	if err := field(meta, "version", &pulled.Version); err != nil {
		return nil, invalidResponse(resp, err)
	}
	s.seen(pulled.Version)
	return pulled, nil
}

// parseETag reads `"12"` (or W/"12").
func parseETag(value string) (int, error) {
	return strconv.Atoi(strings.Trim(strings.TrimPrefix(strings.TrimSpace(value), "W/"), `"`))
}

func ifMatchHeader(ifMatch *int) (http.Header, error) {
	if ifMatch == nil {
		return nil, nil
	}
	if *ifMatch < 0 {
		return nil, invalidArgument(fmt.Sprintf("a version is >= 0, not %d", *ifMatch))
	}
	return http.Header{"If-Match": {`"` + strconv.Itoa(*ifMatch) + `"`}}, nil
}

// PutParams replaces parameter values (optimizer state untouched) and returns the new version.
// With ifMatch (optserve.Int(v)) it is conditional: 412 precondition_failed if the session
// moved past v.
func (s *Session) PutParams(ctx context.Context, params map[string]Tensor, ifMatch *int) (int, error) {
	header, err := ifMatchHeader(ifMatch)
	if err != nil {
		return 0, err
	}
	body, contentType, err := encodeMessage(s.client.codec, "params", params, nil)
	if err != nil {
		return 0, err
	}
	return s.putVersion(ctx, "/params", body, contentType, header)
}

func (s *Session) putVersion(ctx context.Context, suffix string, body []byte, contentType string, header http.Header) (int, error) {
	resp, err := s.client.do(ctx, &call{
		method: http.MethodPut, path: s.path(suffix), body: body, contentType: contentType,
		accept: mediaJSON, header: header,
	})
	if err != nil {
		return 0, err
	}
	var answer struct {
		Version *int `json:"version"`
	}
	if err := decodeJSON(resp, &answer); err != nil {
		return 0, err
	}
	if answer.Version == nil {
		return 0, invalidResponse(resp, fmt.Errorf("the response has no version"))
	}
	s.seen(*answer.Version)
	return *answer.Version, nil
}
