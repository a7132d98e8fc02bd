package optserve

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// Codes the client gives errors of its own (every other code is the server's problem code).
const (
	// CodeTransport: no usable response arrived (refused, reset or dropped connection, timeout,
	// cancelled context). Err holds the cause.
	CodeTransport = "transport_error"
	// CodeInvalidResponse: a success status whose body the client cannot read.
	CodeInvalidResponse = "invalid_response"
	// CodeHTTP: an error status whose body is not a problem document (a proxy's page).
	CodeHTTP = "http_error"
	// CodeInvalidArgument: the call was refused before sending (a tensor whose data does not
	// match its shape, NaN in a JSON body, ...).
	CodeInvalidArgument = "invalid_argument"
)

// Error is everything that goes wrong talking to optserve: a server problem (RFC 9457
// application/problem+json), a transport failure or a response the client cannot read.
//
// Branch on Code, the server's stable code ("session_not_found", "precondition_failed",
// "invalid_hyperparameter", "stale_gradient", ...) or one of the client's Code* constants,
// never on Detail. Problem is the whole problem document with any extra members (for example
// "version" on a 409 stale_gradient, "field" on an invalid hyperparameter).
type Error struct {
	// Status is the HTTP status, 0 when no response arrived.
	Status int
	Code   string
	Detail string
	// Problem is the full problem document (at least "code" and "detail").
	Problem map[string]any
	// Attempts is how many requests the call made, retries included, before this error.
	Attempts int
	// Err is the underlying failure for transport errors and unreadable responses.
	Err error
}

func (e *Error) Error() string {
	status := "-"
	if e.Status != 0 {
		status = fmt.Sprint(e.Status)
	}
	return fmt.Sprintf("optserve: %s %s: %s", status, e.Code, e.Detail)
}

// Unwrap gives the underlying failure, so errors.Is(err, context.Canceled) and errors.As to a
// *net.OpError work through an *Error.
func (e *Error) Unwrap() error { return e.Err }

// ErrorCode is err's code if it is (or wraps) an *Error, else "".
func ErrorCode(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

func newError(status int, code, detail string, err error) *Error {
	return &Error{
		Status:   status,
		Code:     code,
		Detail:   detail,
		Problem:  map[string]any{"code": code, "detail": detail},
		Attempts: 1,
		Err:      err,
	}
}

func invalidArgument(detail string) *Error {
	return newError(0, CodeInvalidArgument, detail, nil)
}

func transportError(err error, attempts int) *Error {
	e := newError(0, CodeTransport, err.Error(), err)
	e.Attempts = attempts
	return e
}

// problemError maps an error response; bodies that are not problem documents still map.
func problemError(status int, body []byte) *Error {
	var problem map[string]any
	if err := json.Unmarshal(body, &problem); err != nil || problem == nil {
		text := strings.TrimSpace(string(body))
		if len(text) > 500 {
			text = text[:500]
		}
		if text == "" {
			text = http.StatusText(status)
		}
		problem = map[string]any{"status": float64(status), "title": http.StatusText(status), "detail": text}
	}
	code, _ := problem["code"].(string)
	if code == "" {
		code = CodeHTTP
	}
	detail, _ := problem["detail"].(string)
	if detail == "" {
		detail, _ = problem["title"].(string)
	}
	if detail == "" {
		detail = http.StatusText(status)
	}
	return &Error{Status: status, Code: code, Detail: detail, Problem: problem, Attempts: 1}
}
