package optserve

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RetryPolicy says how often and how patiently a call is retried after a transport failure, a
// 503, or a 429 (rate limited: refused before anything ran, so every call is retried). Attempts counts every try, the first included (1 = never retry). Before retry n the
// client waits Backoff * 2^(n-1), at most MaxBackoff, shortened at random by up to Jitter of
// itself so that many workers do not retry in step. A 503's or 429's Retry-After is waited at least
// (but never more than MaxBackoff).
type RetryPolicy struct {
	Attempts   int
	Backoff    time.Duration
	MaxBackoff time.Duration
	Jitter     float64 // in [0, 1]
}

// DefaultRetryPolicy is 5 attempts, 100 ms doubling up to 5 s, half of it jittered.
func DefaultRetryPolicy() RetryPolicy {
	return RetryPolicy{Attempts: 5, Backoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second, Jitter: 0.5}
}

func (p RetryPolicy) normalized() RetryPolicy {
	if p.Attempts < 1 {
		p.Attempts = 1
	}
	if p.Backoff < 0 {
		p.Backoff = 0
	}
	if p.MaxBackoff < 0 {
		p.MaxBackoff = 0
	}
	if p.Jitter < 0 || p.Jitter != p.Jitter {
		p.Jitter = 0
	}
	if p.Jitter > 1 {
		p.Jitter = 1
	}
	return p
}

// delay before retry number retry (1 for the first retry); retryAfter < 0 means none given.
func (p RetryPolicy) delay(retry int, retryAfter time.Duration) time.Duration {
	wait := p.Backoff
	for i := 1; i < retry && wait < p.MaxBackoff; i++ {
		wait *= 2
	}
	if wait > p.MaxBackoff {
		wait = p.MaxBackoff
	}
	wait = time.Duration(float64(wait) * (1 - p.Jitter*randomFraction()))
	if retryAfter >= 0 {
		if retryAfter > p.MaxBackoff {
			retryAfter = p.MaxBackoff
		}
		if wait < retryAfter {
			wait = retryAfter
		}
	}
	return wait
}

// randomFraction is uniform in [0, 1) from crypto/rand (Go 1.19's math/rand is not seeded, so
// every worker would jitter in step).
func randomFraction() float64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return 0.5
	}
	return float64(binary.LittleEndian.Uint64(b[:])>>11) / (1 << 53)
}

// retryAfter reads Retry-After as delta-seconds or an HTTP date; -1 when absent or unreadable.
func retryAfter(header http.Header) time.Duration {
	value := strings.TrimSpace(header.Get("Retry-After"))
	if value == "" {
		return -1
	}
	if seconds, err := strconv.ParseFloat(value, 64); err == nil && seconds == seconds {
		if seconds < 0 {
			return 0
		}
		if seconds > 1e9 {
			seconds = 1e9
		}
		return time.Duration(seconds * float64(time.Second))
	}
	if when, err := http.ParseTime(value); err == nil {
		if wait := time.Until(when); wait > 0 {
			return wait
		}
		return 0
	}
	return -1
}

// retryScope says when a call may be sent again.
type retryScope int

const (
	// retrySafe: after any transient failure or a 503 (the call is idempotent, or carries an
	// Idempotency-Key).
	retrySafe retryScope = iota
	// retryUnsent: only when the request surely never left (the connection could not be made),
	// so a non-idempotent create is never sent twice.
	retryUnsent
)

// unsent: the request surely never reached the server (the connection was never made, or the
// server had closed the pooled connection before it was used).
func unsent(err error) bool {
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		return true
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return true
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return true
	}
	return strings.Contains(err.Error(), "server closed idle connection")
}

// transient: a failure of the network or the server worth another try (a timeout, a reset or
// dropped connection), not one of ours such as an unsupported URL scheme.
func transient(err error) bool {
	if unsent(err) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() {
		return true
	}
	if errors.Is(err, context.DeadlineExceeded) { // the attempt's own deadline, not the caller's
		return true
	}
	for _, target := range []error{io.EOF, io.ErrUnexpectedEOF, syscall.ECONNRESET, syscall.EPIPE, syscall.ECONNABORTED} {
		if errors.Is(err, target) {
			return true
		}
	}
	var opErr *net.OpError
	return errors.As(err, &opErr)
}

// newIdempotencyKey is a random (version 4) UUID from crypto/rand.
func newIdempotencyKey() string {
	var u [16]byte
	if _, err := io.ReadFull(rand.Reader, u[:]); err != nil {
		panic("optserve: crypto/rand failed: " + err.Error())
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], u[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], u[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], u[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], u[8:10])
	out[23] = '-'
	hex.Encode(out[24:], u[10:])
	return string(out[:])
}
