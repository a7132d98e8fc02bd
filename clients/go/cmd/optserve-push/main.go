// Command optserve-push pushes one set of gradients to an optserve session and prints the answer.
//
//	optserve-push URL SESSION_ID GRADS_JSON_FILE [json|safetensors]
//
// The file holds {"name": {"shape": [...], "data": [...]}, ...}; the codec (default safetensors)
// is how the gradients travel. The session is joined first (so base_version is its current
// version), pushed once (retried with one Idempotency-Key if the answer is lost) and the answer
// is printed on stdout as JSON: {"version", "applied", "replayed", "attempts",
// "idempotency_key", "staleness", "params": {name: {"shape", "data"}}}. Failures go to stderr as
// the error, plus its problem document, with exit status 1 (2 for a usage error).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"

	optserve "optserve.dev/client"
)

const usage = "usage: optserve-push URL SESSION_ID GRADS_JSON_FILE [json|safetensors]"

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) < 3 || len(args) > 4 {
		fmt.Fprintln(os.Stderr, usage)
		return 2
	}
	codec := optserve.CodecSafetensors
	if len(args) == 4 {
		codec = optserve.Codec(args[3])
		if codec != optserve.CodecJSON && codec != optserve.CodecSafetensors {
			fmt.Fprintf(os.Stderr, "optserve-push: unknown codec %q\n%s\n", args[3], usage)
			return 2
		}
	}
	text, err := os.ReadFile(args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "optserve-push:", err)
		return 2
	}
	var grads map[string]optserve.Tensor
	if err := json.Unmarshal(text, &grads); err != nil {
		fmt.Fprintf(os.Stderr, "optserve-push: %s is not {name: {\"shape\", \"data\"}}: %v\n", args[2], err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	client, err := optserve.NewClient(args[0], optserve.WithCodec(codec))
	if err != nil {
		fmt.Fprintln(os.Stderr, "optserve-push:", err)
		return 2
	}
	session, err := client.Session(ctx, args[1])
	if err != nil {
		return fail(err)
	}
	result, err := session.Push(ctx, grads)
	if err != nil {
		return fail(err)
	}
	out := map[string]any{
		"version":         result.Version,
		"applied":         result.Applied,
		"replayed":        result.Replayed,
		"attempts":        result.Attempts,
		"idempotency_key": result.IdempotencyKey,
		"params":          result.Params,
	}
	if result.Staleness != nil {
		out["staleness"] = *result.Staleness
	}
	if result.Skipped != "" {
		out["skipped"] = result.Skipped
	}
	encoder := json.NewEncoder(os.Stdout)
	if err := encoder.Encode(out); err != nil {
		// NaN or infinity in the params (possible with safetensors) has no JSON text.
		fmt.Fprintln(os.Stderr, "optserve-push: cannot print the answer:", err)
		return 1
	}
	return 0
}

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "optserve-push:", err)
	var e *optserve.Error
	if errors.As(err, &e) {
		if problem, jsonErr := json.Marshal(e.Problem); jsonErr == nil {
			fmt.Fprintln(os.Stderr, string(problem))
		}
	}
	return 1
}
