// Package optserve is the Go client of optserve, an optimizer as a service: the server keeps a
// training session's parameters and torch.optim-exact optimizer state, workers push gradients
// over HTTP and get the updated parameters back.
//
//	client, err := optserve.NewClient("http://127.0.0.1:8000")
//	session, err := client.CreateSession(ctx, optserve.CreateRequest{
//		Optimizer: map[string]any{"name": "adam", "lr": 1e-3},
//		Params:    map[string]optserve.Tensor{"w": optserve.Zeros(2, 3)},
//	})
//	result, err := session.Push(ctx, map[string]optserve.Tensor{"w": grad})
//	w := result.Params["w"]
//
// Tensors travel as safetensors (raw little-endian float32, the default) or as JSON
// ({"shape", "data"} with float32-exact decimals). Every failure is an *Error carrying the
// server's stable problem code ("session_not_found", "precondition_failed", ...) or the
// client's own ("transport_error", "invalid_response", "invalid_argument").
//
// Retries follow the Python client: a call is retried after a transport failure or a 503
// (waiting at least Retry-After), and any call after a 429 (rate limited: nothing ran), never
// after another status. An API key goes in WithAPIKey; a missing or bad one is a 401
// "unauthorized" error. A push carries one
// Idempotency-Key over all its attempts, so the server applies it at most once; a session
// create is retried only when its connection could not even be made.
package optserve
