package optserve

import (
	"bytes"
	"encoding/json"
	"fmt"
	"mime"
	"sort"
	"strings"
)

// Codec is how tensors travel: CodecSafetensors (raw float32, the default) or CodecJSON.
type Codec string

const (
	// CodecSafetensors sends application/x-safetensors: tensors by name as raw little-endian
	// float32 (NaN and infinities intact, about 5x smaller than JSON), the other fields as JSON
	// texts in the header's __metadata__.
	CodecSafetensors Codec = "safetensors"
	// CodecJSON sends application/json with {"shape", "data"} tensors: for debugging, or for
	// proxies that only pass JSON.
	CodecJSON Codec = "json"
)

const (
	mediaJSON        = "application/json"
	mediaProblemJSON = "application/problem+json"
	mediaSafetensors = "application/x-safetensors"
)

// mediaType is the essence of a Content-Type ("application/json; charset=utf-8" ->
// "application/json"); a missing one means JSON.
func mediaType(contentType string) string {
	if strings.TrimSpace(contentType) == "" {
		return mediaJSON
	}
	if essence, _, err := mime.ParseMediaType(contentType); err == nil {
		return essence
	}
	return strings.ToLower(strings.TrimSpace(strings.SplitN(contentType, ";", 2)[0]))
}

// encodeMessage writes tensors plus JSON-able fields in the codec: JSON puts the tensors under
// tensorField beside the fields; safetensors stores each field as its JSON text in the metadata.
// Both are deterministic (sorted keys), so the same push always has the same bytes.
func encodeMessage(codec Codec, tensorField string, tensors map[string]Tensor, fields map[string]any) ([]byte, string, error) {
	if codec == CodecJSON {
		body, err := encodeJSONMessage(tensorField, tensors, fields)
		return body, mediaJSON, err
	}
	metadata, err := encodeMetadata(fields)
	if err != nil {
		return nil, "", err
	}
	body, err := EncodeSafetensors(tensors, metadata)
	if err != nil {
		return nil, "", invalidArgument(err.Error())
	}
	return body, mediaSafetensors, nil
}

// encodeMetadata turns each field into its JSON text; no fields means no metadata at all.
func encodeMetadata(fields map[string]any) (map[string]string, error) {
	if len(fields) == 0 {
		return nil, nil
	}
	metadata := make(map[string]string, len(fields))
	for key, value := range fields {
		text, err := marshalJSON(value)
		if err != nil {
			return nil, invalidArgument(fmt.Sprintf("field %q: %v", key, err))
		}
		metadata[key] = string(text)
	}
	return metadata, nil
}

func encodeJSONMessage(tensorField string, tensors map[string]Tensor, fields map[string]any) ([]byte, error) {
	keys := make([]string, 0, len(fields)+1)
	for key := range fields {
		if key != tensorField {
			keys = append(keys, key)
		}
	}
	sort.Strings(keys)
	var b bytes.Buffer
	b.WriteByte('{')
	for _, key := range keys {
		text, err := marshalJSON(fields[key])
		if err != nil {
			return nil, invalidArgument(fmt.Sprintf("field %q: %v", key, err))
		}
		b.Write(mustJSON(key))
		b.WriteByte(':')
		b.Write(text)
		b.WriteByte(',')
	}
	b.Write(mustJSON(tensorField))
	b.WriteString(":")
	tensorsJSON, err := encodeJSONTensors(tensors)
	if err != nil {
		return nil, err
	}
	b.Write(tensorsJSON)
	b.WriteByte('}')
	return b.Bytes(), nil
}

// encodeJSONTensors writes {name: {"shape", "data"}} in name order.
func encodeJSONTensors(tensors map[string]Tensor) ([]byte, error) {
	names := make([]string, 0, len(tensors))
	size := 2
	for name, tensor := range tensors {
		names = append(names, name)
		size += 32 + len(name) + 12*len(tensor.Data)
	}
	sort.Strings(names)
	b := make([]byte, 0, size)
	b = append(b, '{')
	for i, name := range names {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, mustJSON(name)...)
		b = append(b, ':')
		var err error
		if b, err = appendTensorJSON(b, tensors[name]); err != nil {
			return nil, invalidArgument(fmt.Sprintf("tensor %q: %v", name, err))
		}
	}
	return append(b, '}'), nil
}

// marshalJSON is json.Marshal without HTML escaping (the server reads either, this is shorter).
func marshalJSON(value any) ([]byte, error) {
	var b bytes.Buffer
	encoder := json.NewEncoder(&b)
	encoder.SetEscapeHTML(false)
	if err := encoder.Encode(value); err != nil {
		return nil, err
	}
	return bytes.TrimRight(b.Bytes(), "\n"), nil
}

func mustJSON(s string) []byte {
	text, _ := marshalJSON(s)
	return text
}

// decodeMessage reads a response body in whichever media type the server chose: the tensors
// (under tensorField in JSON) and every other field as raw JSON.
func decodeMessage(body []byte, contentType, tensorField string) (map[string]Tensor, map[string]json.RawMessage, error) {
	if mediaType(contentType) == mediaSafetensors {
		tensors, metadata, err := DecodeSafetensors(body)
		if err != nil {
			return nil, nil, err
		}
		return tensors, decodeMetadata(metadata), nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return nil, nil, fmt.Errorf("the response is not a JSON object: %w", err)
	}
	tensors := map[string]Tensor{}
	if raw, ok := fields[tensorField]; ok {
		delete(fields, tensorField)
		if !bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
			if err := json.Unmarshal(raw, &tensors); err != nil {
				return nil, nil, fmt.Errorf("%q in the response: %w", tensorField, err)
			}
		}
	}
	return tensors, fields, nil
}

// decodeMetadata turns metadata JSON texts into raw JSON values; a text that is not JSON is
// taken as a bare string, as the server does.
func decodeMetadata(metadata map[string]string) map[string]json.RawMessage {
	fields := make(map[string]json.RawMessage, len(metadata))
	for key, text := range metadata {
		if json.Valid([]byte(text)) {
			fields[key] = json.RawMessage(text)
		} else {
			fields[key] = mustJSON(text)
		}
	}
	return fields
}

// field decodes one optional field into out; a missing or null field leaves out untouched.
func field(fields map[string]json.RawMessage, name string, out any) error {
	raw, ok := fields[name]
	if !ok || bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("%q in the response: %w", name, err)
	}
	return nil
}
