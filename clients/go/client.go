package optserve

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Version of this client, sent in the User-Agent.
const Version = "0.1.0"

// listPage is how many sessions one request fetches when ListSessions walks every page (the
// server's maximum).
const listPage = 1000

// Client is a connection to one optserve server. It is safe for concurrent use by many
// goroutines, as are the Sessions it hands out.
type Client struct {
	base      *url.URL
	apiKey    string
	codec     Codec
	http      *http.Client
	retries   RetryPolicy
	timeout   time.Duration
	userAgent string
}

// Option configures a Client.
type Option func(*Client) error

// WithAPIKey sends "Authorization: Bearer <key>" with every request.
func WithAPIKey(key string) Option {
	return func(c *Client) error { c.apiKey = key; return nil }
}

// WithCodec picks how tensors travel: CodecSafetensors (default) or CodecJSON.
func WithCodec(codec Codec) Option {
	return func(c *Client) error {
		if codec != CodecSafetensors && codec != CodecJSON {
			return fmt.Errorf("optserve: codec must be %q or %q, not %q", CodecSafetensors, CodecJSON, codec)
		}
		c.codec = codec
		return nil
	}
}

// WithHTTPClient sends requests through client (its Transport, proxies, TLS settings). Leave
// its Timeout at 0: the client sets a deadline per attempt (see WithTimeout), and a long poll
// or a sync-mode push legitimately waits.
func WithHTTPClient(client *http.Client) Option {
	return func(c *Client) error {
		if client == nil {
			return errors.New("optserve: WithHTTPClient(nil)")
		}
		c.http = client
		return nil
	}
}

// WithRetries sets the retry policy (DefaultRetryPolicy() unless given).
func WithRetries(policy RetryPolicy) Option {
	return func(c *Client) error { c.retries = policy.normalized(); return nil }
}

// WithoutRetries makes every call a single attempt.
func WithoutRetries() Option { return WithRetries(RetryPolicy{Attempts: 1}) }

// WithTimeout bounds each attempt (default 60 s; 0 for none). A long poll's attempt gets its wait
// on top, a sync-mode push its session's round timeout. The context passed to a call bounds the
// whole call, retries included.
func WithTimeout(timeout time.Duration) Option {
	return func(c *Client) error { c.timeout = timeout; return nil }
}

// WithUserAgent replaces the User-Agent header.
func WithUserAgent(userAgent string) Option {
	return func(c *Client) error { c.userAgent = userAgent; return nil }
}

// NewClient makes a client of the server at baseURL ("http://127.0.0.1:8000").
func NewClient(baseURL string, opts ...Option) (*Client, error) {
	base, err := url.Parse(strings.TrimRight(baseURL, "/"))
	if err != nil {
		return nil, fmt.Errorf("optserve: invalid server URL %q: %w", baseURL, err)
	}
	if base.Scheme != "http" && base.Scheme != "https" || base.Host == "" {
		return nil, fmt.Errorf("optserve: invalid server URL %q: want http(s)://host[:port]", baseURL)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = 64 // many goroutines pushing to one server
	c := &Client{
		base:      base,
		codec:     CodecSafetensors,
		http:      &http.Client{Transport: transport},
		retries:   DefaultRetryPolicy(),
		timeout:   60 * time.Second,
		userAgent: fmt.Sprintf("optserve-client-go/%s %s", Version, runtime.Version()),
	}
	for _, opt := range opts {
		if err := opt(c); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// URL is the server's base URL.
func (c *Client) URL() string { return c.base.String() }

// Codec is the codec this client sends and asks for.
func (c *Client) Codec() Codec { return c.codec }

// accept is the Accept header of tensor-carrying responses: JSON stays acceptable at a lower
// weight, so a server without safetensors still answers.
func (c *Client) accept() string {
	if c.codec == CodecSafetensors {
		return mediaSafetensors + ", " + mediaJSON + ";q=0.5"
	}
	return mediaJSON
}

// -- calls ----------------------------------------------------------------------------------------

// call is one API operation: the request to send on every attempt and how it may be retried.
type call struct {
	method      string
	path        string // escaped
	query       url.Values
	body        []byte
	contentType string
	accept      string
	header      http.Header
	retry       retryScope
	// doneStatus, after an attempt that may have acted, means that attempt did the work (a
	// DELETE's 404 on a retry).
	doneStatus int
	// extra time for this call's attempts on top of the client's timeout (long poll, round)
	extra time.Duration
	// keyed: the call carries an Idempotency-Key; net/http would then re-send it by itself on
	// a broken pooled connection, outside the retry policy, so the client keeps that decision.
	keyed bool
}

type response struct {
	status   int
	header   http.Header
	body     []byte
	attempts int
	// maybeApplied: an earlier attempt may have reached the server and acted
	maybeApplied bool
}

// do runs a call until it succeeds, fails for good or the policy gives up; error statuses
// become *Error (304 is returned as a response).
func (c *Client) do(ctx context.Context, cl *call) (*response, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	address := strings.TrimRight(c.base.String(), "/") + cl.path
	if len(cl.query) > 0 {
		address += "?" + cl.query.Encode()
	}

	policy := c.retries
	attempts := 0
	maybeApplied := false
	for {
		attempts++
		resp, err := c.attempt(ctx, cl, address)
		var wait time.Duration
		if err != nil {
			if ctx.Err() != nil { // the caller gave up: no retry, whatever the policy
				return nil, transportError(ctxError(ctx, err), attempts)
			}
			retryable := unsent(err) || cl.retry == retrySafe && transient(err)
			if !retryable || attempts >= policy.Attempts {
				return nil, transportError(err, attempts)
			}
			if !unsent(err) {
				maybeApplied = true
			}
			wait = policy.delay(attempts, -1)
		} else {
			// 429: refused before anything ran, so any call may go again (after Retry-After).
			limited := resp.status == http.StatusTooManyRequests
			unavailable := resp.status == http.StatusServiceUnavailable && cl.retry == retrySafe
			if !(limited || unavailable) || attempts >= policy.Attempts {
				resp.attempts, resp.maybeApplied = attempts, maybeApplied
				return c.finish(cl, resp)
			}
			if unavailable {
				maybeApplied = true // the store may have failed after the write went through
			}
			wait = policy.delay(attempts, retryAfter(resp.header))
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, transportError(ctx.Err(), attempts)
		case <-timer.C:
		}
	}
}

// ctxError keeps the caller's context error visible to errors.Is.
func ctxError(ctx context.Context, err error) error {
	if errors.Is(err, ctx.Err()) {
		return err
	}
	return fmt.Errorf("%w (%v)", ctx.Err(), err)
}

// attempt sends the request once and reads the whole response within the attempt's deadline.
func (c *Client) attempt(ctx context.Context, cl *call, address string) (*response, error) {
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout+cl.extra)
		defer cancel()
	}
	var body io.Reader
	if cl.body != nil {
		body = bytes.NewReader(cl.body)
	}
	req, err := http.NewRequestWithContext(ctx, cl.method, address, body)
	if err != nil {
		return nil, err
	}
	if cl.keyed {
		req.GetBody = nil
	}
	for name, values := range cl.header {
		req.Header[name] = values
	}
	req.Header.Set("User-Agent", c.userAgent)
	req.Header.Set("Accept", cl.accept)
	if cl.contentType != "" {
		req.Header.Set("Content-Type", cl.contentType)
	}
	if c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	return &response{status: resp.StatusCode, header: resp.Header, body: data}, nil
}

func (c *Client) finish(cl *call, resp *response) (*response, error) {
	if resp.maybeApplied && cl.doneStatus != 0 && resp.status == cl.doneStatus {
		// e.g. DELETE: 404 on a retry means an earlier attempt (whose answer was lost) did it.
		resp.status, resp.body = http.StatusNoContent, nil
		return resp, nil
	}
	if resp.status >= 400 {
		e := problemError(resp.status, resp.body)
		e.Attempts = resp.attempts
		return nil, e
	}
	return resp, nil
}

// invalidResponse is a success status whose body cannot be read.
func invalidResponse(resp *response, err error) *Error {
	e := newError(resp.status, CodeInvalidResponse, err.Error(), err)
	e.Attempts = resp.attempts
	return e
}

func sessionPath(id string, suffix string) string {
	return "/v1/sessions/" + url.PathEscape(id) + suffix
}

// decodeJSON reads a JSON success body into out.
func decodeJSON(resp *response, out any) error {
	if err := json.Unmarshal(resp.body, out); err != nil {
		return invalidResponse(resp, fmt.Errorf("the response is not the expected JSON: %w", err))
	}
	return nil
}

// -- sessions ---------------------------------------------------------------------------------------

// Mode is how pushes become steps: "async" (each push one step, the default) or "sync" (rounds
// of Workers pushes, one step on their mean gradient; a round closes TimeoutS after its first
// push and then applies if at least MinWorkers joined, else fails with 504 round_timeout).
type Mode struct {
	Type       string  `json:"type"`
	Workers    int     `json:"workers,omitempty"`
	TimeoutS   float64 `json:"timeout_s,omitempty"`
	MinWorkers int     `json:"min_workers,omitempty"`
}

// TensorDecl is a declared tensor: its shape (and dtype, always float32).
type TensorDecl struct {
	Shape []int  `json:"shape"`
	DType string `json:"dtype,omitempty"`
}

// SessionInfo is a session as the server describes it: every hyperparameter with its default
// filled in, the tensors, the lr the next update uses. Raw holds the whole document, including
// members this client does not know.
type SessionInfo struct {
	ID           string                `json:"id"`
	Name         *string               `json:"name"`
	Version      int                   `json:"version"`
	Optimizer    map[string]any        `json:"optimizer"`
	Tensors      map[string]TensorDecl `json:"tensors"`
	Mode         Mode                  `json:"mode"`
	LRSchedule   map[string]any        `json:"lr_schedule"`
	LR           float64               `json:"lr"`
	ClipGradNorm *float64              `json:"clip_grad_norm"`
	Nonfinite    string                `json:"nonfinite"`
	MaxStaleness *int                  `json:"max_staleness"`
	Staleness    string                `json:"staleness"`
	TTLS         *float64              `json:"ttl_s"`
	CreatedAt    string                `json:"created_at"`
	UpdatedAt    string                `json:"updated_at"`
	Raw          map[string]any        `json:"-"`
}

// UnmarshalJSON fills the typed fields and Raw.
func (s *SessionInfo) UnmarshalJSON(text []byte) error {
	type plain SessionInfo
	var typed plain
	if err := json.Unmarshal(text, &typed); err != nil {
		return err
	}
	if err := json.Unmarshal(text, &typed.Raw); err != nil {
		return err
	}
	*s = SessionInfo(typed)
	return nil
}

// CreateRequest describes a new session. Only Optimizer is required.
type CreateRequest struct {
	// Optimizer is torch's name and hyperparameters: {"name": "adam", "lr": 1e-3, "betas":
	// []float64{0.9, 0.99}}: sgd, adam, adamw, rmsprop, adagrad, nadam, radam, adamax, lion.
	Optimizer map[string]any
	// Params are the initial values.
	Params map[string]Tensor
	// Tensors declares zero-initialised tensors by shape, so large ones need not be uploaded.
	Tensors map[string][]int
	// Mode is async (nil) or sync: Mode{Type: "sync", Workers: 4, TimeoutS: 30}.
	Mode *Mode
	// LRSchedule is {"type": "cosine", "T_max": 1000, ...} with torch.optim.lr_scheduler's names.
	LRSchedule map[string]any
	// ClipGradNorm > 0 clips the global gradient norm of each push (0: no clipping).
	ClipGradNorm float64
	// Nonfinite is "reject" (422 non_finite, the default) or "skip".
	Nonfinite string
	// MaxStaleness refuses pushes whose base_version is more than this behind (nil: any).
	MaxStaleness *int
	// Staleness is what a stale push gets: "reject" (409 stale_gradient, default) or "scale"
	// (applied with lr / (1 + staleness)).
	Staleness string
	Name      string
	// TTLS > 0 has the server delete the session once it goes that many seconds unused (any use
	// renews it; 0: never expires).
	TTLS float64
}

// Int returns a pointer to v, for the optional integer fields (MaxStaleness, BaseVersion, ...).
func Int(v int) *int { return &v }

// Float returns a pointer to v, for the optional float fields.
func Float(v float64) *float64 { return &v }

// String returns a pointer to v, for the optional string fields.
func String(v string) *string { return &v }

// CreateSession creates a session and returns a handle on it.
//
// The create is not idempotent and the server takes no key for it, so it is retried only when
// its connection could not even be made: a create whose answer was lost may have made a session.
func (c *Client) CreateSession(ctx context.Context, req CreateRequest) (*Session, error) {
	if req.Optimizer == nil {
		return nil, invalidArgument("CreateRequest.Optimizer is required ({\"name\": \"adam\", ...})")
	}
	fields := map[string]any{"optimizer": req.Optimizer}
	if len(req.Tensors) > 0 {
		tensors := make(map[string]TensorDecl, len(req.Tensors))
		for name, shape := range req.Tensors {
			if shape == nil {
				shape = []int{}
			}
			tensors[name] = TensorDecl{Shape: shape}
		}
		fields["tensors"] = tensors
	}
	if req.Mode != nil {
		fields["mode"] = req.Mode
	}
	if req.LRSchedule != nil {
		fields["lr_schedule"] = req.LRSchedule
	}
	if req.ClipGradNorm != 0 {
		fields["clip_grad_norm"] = req.ClipGradNorm
	}
	if req.Nonfinite != "" {
		fields["nonfinite"] = req.Nonfinite
	}
	if req.MaxStaleness != nil {
		fields["max_staleness"] = *req.MaxStaleness
	}
	if req.Staleness != "" {
		fields["staleness"] = req.Staleness
	}
	if req.Name != "" {
		fields["name"] = req.Name
	}
	if req.TTLS != 0 {
		fields["ttl_s"] = req.TTLS
	}
	params := req.Params
	if params == nil {
		params = map[string]Tensor{}
	}
	body, contentType, err := encodeMessage(c.codec, "params", params, fields)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(ctx, &call{
		method: http.MethodPost, path: "/v1/sessions", body: body, contentType: contentType,
		accept: mediaJSON, retry: retryUnsent,
	})
	if err != nil {
		return nil, err
	}
	var info SessionInfo
	if err := decodeJSON(resp, &info); err != nil {
		return nil, err
	}
	return newSession(c, &info), nil
}

// Session joins an existing session (one GET, so a wrong id fails here, not at the first push).
func (c *Client) Session(ctx context.Context, id string) (*Session, error) {
	info, err := c.sessionInfo(ctx, id)
	if err != nil {
		return nil, err
	}
	return newSession(c, info), nil
}

func (c *Client) sessionInfo(ctx context.Context, id string) (*SessionInfo, error) {
	resp, err := c.do(ctx, &call{method: http.MethodGet, path: sessionPath(id, ""), accept: mediaJSON})
	if err != nil {
		return nil, err
	}
	var info SessionInfo
	if err := decodeJSON(resp, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// ListOptions pages ListSessions; Limit 0 walks every page.
type ListOptions struct {
	Offset int
	Limit  int
}

// ListSessions describes the server's sessions.
func (c *Client) ListSessions(ctx context.Context, opts ...ListOptions) ([]SessionInfo, error) {
	var o ListOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.Limit > 0 {
		return c.listPage(ctx, o.Offset, o.Limit)
	}
	sessions := []SessionInfo{}
	for {
		page, err := c.listPage(ctx, o.Offset+len(sessions), listPage)
		if err != nil {
			return nil, err
		}
		sessions = append(sessions, page...)
		if len(page) < listPage {
			return sessions, nil
		}
	}
}

func (c *Client) listPage(ctx context.Context, offset, limit int) ([]SessionInfo, error) {
	query := url.Values{"offset": {strconv.Itoa(offset)}, "limit": {strconv.Itoa(limit)}}
	resp, err := c.do(ctx, &call{method: http.MethodGet, path: "/v1/sessions", query: query, accept: mediaJSON})
	if err != nil {
		return nil, err
	}
	var page struct {
		Sessions []SessionInfo `json:"sessions"`
	}
	if err := decodeJSON(resp, &page); err != nil {
		return nil, err
	}
	return page.Sessions, nil
}
