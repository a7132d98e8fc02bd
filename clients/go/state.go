package optserve

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// State is the optimizer-state document (a checkpoint) with torch's state names, the same
// whichever codec carried it: per tensor its arrays ("param", "exp_avg", "exp_avg_sq",
// "momentum_buffer", ...) and scalars ("step").
//
// On the wire JSON nests it ({"tensors": {"w": {"param": {...}, "step": 3}}}); safetensors is
// flat, each array named "<tensor>/<state name>" (split at the last "/": state names never
// hold one, tensor names may) and the scalars in the metadata as "scalars": {"w": {"step": 3}}.
type State struct {
	Version         int
	Optimizer       map[string]any
	LRSchedule      map[string]any
	LRScheduleState map[string]any
	Tensors         map[string]TensorState
}

// TensorState is one tensor's entry of a State.
type TensorState struct {
	Arrays  map[string]Tensor
	Scalars map[string]float64
}

// State exports the full optimizer state (a checkpoint).
func (s *Session) State(ctx context.Context) (*State, error) {
	resp, err := s.client.do(ctx, &call{method: http.MethodGet, path: s.path("/state"), accept: s.client.accept()})
	if err != nil {
		return nil, err
	}
	state, err := decodeState(resp.body, resp.header.Get("Content-Type"))
	if err != nil {
		return nil, invalidResponse(resp, err)
	}
	s.seen(state.Version)
	return state, nil
}

// LoadState restores a State (from this session or another one with the same tensors) and
// returns the new version; ifMatch (optserve.Int(v)) makes it conditional (412 otherwise).
func (s *Session) LoadState(ctx context.Context, doc *State, ifMatch *int) (int, error) {
	if doc == nil {
		return 0, invalidArgument("LoadState needs a state document")
	}
	header, err := ifMatchHeader(ifMatch)
	if err != nil {
		return 0, err
	}
	body, contentType, err := encodeState(doc, s.client.codec)
	if err != nil {
		return 0, err
	}
	return s.putVersion(ctx, "/state", body, contentType, header)
}

func stateFields(doc *State) map[string]any {
	fields := map[string]any{}
	if doc.Optimizer != nil {
		fields["optimizer"] = doc.Optimizer
	}
	if doc.LRSchedule != nil {
		fields["lr_schedule"] = doc.LRSchedule
	}
	if doc.LRScheduleState != nil {
		fields["lr_schedule_state"] = doc.LRScheduleState
	}
	return fields
}

func encodeState(doc *State, codec Codec) ([]byte, string, error) {
	fields := stateFields(doc)
	if codec == CodecJSON {
		tensors := make(map[string]map[string]json.RawMessage, len(doc.Tensors))
		for name, entry := range doc.Tensors {
			members := map[string]json.RawMessage{}
			for key, array := range entry.Arrays {
				text, err := appendTensorJSON(nil, array)
				if err != nil {
					return nil, "", invalidArgument(fmt.Sprintf("state %s/%s: %v", name, key, err))
				}
				members[key] = text
			}
			for key, value := range entry.Scalars {
				text, err := marshalJSON(value)
				if err != nil {
					return nil, "", invalidArgument(fmt.Sprintf("state %s/%s: %v", name, key, err))
				}
				members[key] = text
			}
			tensors[name] = members
		}
		fields["tensors"] = tensors
		body, err := marshalJSON(fields)
		if err != nil {
			return nil, "", invalidArgument(err.Error())
		}
		return body, mediaJSON, nil
	}
	flat := map[string]Tensor{}
	scalars := map[string]map[string]float64{}
	for name, entry := range doc.Tensors {
		for key, array := range entry.Arrays {
			if strings.Contains(key, "/") {
				return nil, "", invalidArgument(fmt.Sprintf("state name %q holds a /", key))
			}
			flat[name+"/"+key] = array
		}
		if len(entry.Scalars) > 0 {
			scalars[name] = entry.Scalars
		}
	}
	fields["scalars"] = scalars
	return encodeMessage(CodecSafetensors, "tensors", flat, fields)
}

func decodeState(body []byte, contentType string) (*State, error) {
	state := &State{Tensors: map[string]TensorState{}}
	entry := func(name string) TensorState {
		e, ok := state.Tensors[name]
		if !ok {
			e = TensorState{Arrays: map[string]Tensor{}, Scalars: map[string]float64{}}
			state.Tensors[name] = e
		}
		return e
	}
	var fields map[string]json.RawMessage
	if mediaType(contentType) == mediaSafetensors {
		flat, metadata, err := DecodeSafetensors(body)
		if err != nil {
			return nil, err
		}
		fields = decodeMetadata(metadata)
		for flatName, array := range flat {
			cut := strings.LastIndex(flatName, "/")
			if cut < 0 {
				return nil, fmt.Errorf("state tensor %q is not named <tensor>/<state>", flatName)
			}
			entry(flatName[:cut]).Arrays[flatName[cut+1:]] = array
		}
		var scalars map[string]map[string]float64
		if err := field(fields, "scalars", &scalars); err != nil {
			return nil, err
		}
		for name, values := range scalars {
			e := entry(name)
			for key, value := range values {
				e.Scalars[key] = value
			}
		}
	} else {
		if err := json.Unmarshal(body, &fields); err != nil {
			return nil, fmt.Errorf("the state response is not a JSON object: %w", err)
		}
		var tensors map[string]map[string]json.RawMessage
		if err := field(fields, "tensors", &tensors); err != nil {
			return nil, err
		}
		if tensors == nil {
			return nil, fmt.Errorf(`the state response has no "tensors" object`)
		}
		for name, members := range tensors {
			e := entry(name)
			for key, raw := range members {
				text := strings.TrimSpace(string(raw))
				if strings.HasPrefix(text, "{") {
					var array Tensor
					if err := json.Unmarshal(raw, &array); err != nil {
						return nil, fmt.Errorf("tensors.%s.%s: %w", name, key, err)
					}
					e.Arrays[key] = array
				} else {
					var value float64
					if err := json.Unmarshal(raw, &value); err != nil {
						return nil, fmt.Errorf("tensors.%s.%s: %w", name, key, err)
					}
					e.Scalars[key] = value
				}
			}
		}
	}
	for _, f := range []struct {
		name string
		out  any
	}{
		{"version", &state.Version}, {"optimizer", &state.Optimizer},
		{"lr_schedule", &state.LRSchedule}, {"lr_schedule_state", &state.LRScheduleState},
	} {
		if err := field(fields, f.name, f.out); err != nil {
			return nil, err
		}
	}
	return state, nil
}
