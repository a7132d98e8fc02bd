package optserve

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"unicode/utf8"
)

// safetensors, F32 only: an 8-byte little-endian header length N, N bytes of JSON header
// (padded with spaces so the data section starts at a multiple of 8), then the tensors' bytes
// back to back. The header maps each tensor name to {"dtype", "shape", "data_offsets"} and
// "__metadata__" to an object of strings.
//
// EncodeSafetensors writes the bytes the Python safetensors package's save() writes for the same
// tensors and metadata: tensor names sorted by bytes with the data in that order, strings escaped
// as serde_json escapes them, the same padding. The one difference: the package writes metadata
// keys in a Rust HashMap's (per-process random) order, this encoder sorts them, so the bytes are
// identical whenever the metadata has at most one key. DecodeSafetensors applies the package's checks
// before allocating anything (header size cap, each byte range matches its shape, the ranges
// tile the data section exactly, no name given twice).

// MetadataKey is the header entry holding the string metadata.
const MetadataKey = "__metadata__"

// MaxSafetensorsHeader is the largest header accepted, as in the safetensors crate.
const MaxSafetensorsHeader = 100_000_000

const (
	stLengthBytes = 8
	stAlign       = 8
	stF32         = "F32"
)

// SafetensorsError is a body that is not a safetensors file this codec accepts, or input that
// cannot be written as one.
type SafetensorsError struct{ Reason string }

func (e *SafetensorsError) Error() string { return "safetensors: " + e.Reason }

func stErrorf(format string, args ...any) error {
	return &SafetensorsError{Reason: fmt.Sprintf(format, args...)}
}

// EncodeSafetensors writes float32 tensors and string metadata as safetensors bytes. A nil
// metadata map writes no "__metadata__" entry, an empty one writes an empty object.
func EncodeSafetensors(tensors map[string]Tensor, metadata map[string]string) ([]byte, error) {
	names := make([]string, 0, len(tensors))
	for name, tensor := range tensors {
		if name == MetadataKey {
			return nil, stErrorf("tensor name %q is reserved", name)
		}
		if !utf8.ValidString(name) {
			return nil, stErrorf("tensor name %q is not valid UTF-8", name)
		}
		if err := tensor.Validate(); err != nil {
			return nil, stErrorf("tensor %q: %v", name, err)
		}
		names = append(names, name)
	}
	sort.Strings(names)

	header := make([]byte, 0, 64+96*len(names))
	header = append(header, '{')
	if metadata != nil {
		keys := make([]string, 0, len(metadata))
		for key, value := range metadata {
			if !utf8.ValidString(key) || !utf8.ValidString(value) {
				return nil, stErrorf("metadata %q is not valid UTF-8", key)
			}
			keys = append(keys, key)
		}
		sort.Strings(keys)
		header = appendJSONString(header, MetadataKey)
		header = append(header, ":{"...)
		for i, key := range keys {
			if i > 0 {
				header = append(header, ',')
			}
			header = appendJSONString(header, key)
			header = append(header, ':')
			header = appendJSONString(header, metadata[key])
		}
		header = append(header, '}')
	}
	offset := 0
	for i, name := range names {
		tensor := tensors[name]
		if i > 0 || metadata != nil {
			header = append(header, ',')
		}
		header = appendJSONString(header, name)
		header = append(header, `:{"dtype":"F32","shape":[`...)
		for j, d := range tensor.Shape {
			if j > 0 {
				header = append(header, ',')
			}
			header = strconv.AppendInt(header, int64(d), 10)
		}
		header = append(header, `],"data_offsets":[`...)
		header = strconv.AppendInt(header, int64(offset), 10)
		header = append(header, ',')
		offset += 4 * len(tensor.Data)
		header = strconv.AppendInt(header, int64(offset), 10)
		header = append(header, "]}"...)
	}
	header = append(header, '}')
	for len(header)%stAlign != 0 {
		header = append(header, ' ')
	}

	out := make([]byte, stLengthBytes+len(header)+offset)
	binary.LittleEndian.PutUint64(out, uint64(len(header)))
	copy(out[stLengthBytes:], header)
	at := stLengthBytes + len(header)
	for _, name := range names {
		for _, v := range tensors[name].Data {
			binary.LittleEndian.PutUint32(out[at:], math.Float32bits(v))
			at += 4
		}
	}
	return out, nil
}

// appendJSONString writes s as serde_json does: only '"', '\\' and control characters are
// escaped (\b \t \n \f \r short, the others \u00xx), everything else is written as it is.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c == '\b':
			b = append(b, '\\', 'b')
		case c == '\t':
			b = append(b, '\\', 't')
		case c == '\n':
			b = append(b, '\\', 'n')
		case c == '\f':
			b = append(b, '\\', 'f')
		case c == '\r':
			b = append(b, '\\', 'r')
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

// DecodeSafetensors reads safetensors bytes: the tensors by name (their own memory, native
// float32) and the metadata strings (nil when the header has none).
func DecodeSafetensors(data []byte) (map[string]Tensor, map[string]string, error) {
	if len(data) < stLengthBytes {
		return nil, nil, stErrorf("%d bytes are shorter than the 8-byte header length", len(data))
	}
	headerLen := binary.LittleEndian.Uint64(data)
	if headerLen > MaxSafetensorsHeader {
		return nil, nil, stErrorf("a header of %d bytes exceeds the limit", headerLen)
	}
	if headerLen > uint64(len(data)-stLengthBytes) {
		return nil, nil, stErrorf("header length %d exceeds the %d bytes that follow it",
			headerLen, len(data)-stLengthBytes)
	}
	start := stLengthBytes + int(headerLen)
	header := data[stLengthBytes:start]
	if !utf8.Valid(header) {
		return nil, nil, stErrorf("the header is not valid UTF-8")
	}
	names, values, err := objectMembers(header)
	if err != nil {
		return nil, nil, stErrorf("the header is not a JSON object: %v", err)
	}

	type layout struct {
		name       string
		begin, end int
		shape      []int
	}
	var metadata map[string]string
	layouts := make([]layout, 0, len(names))
	for i, name := range names {
		if name == MetadataKey {
			if metadata, err = decodeMetadataStrings(values[i]); err != nil {
				return nil, nil, err
			}
			continue
		}
		shape, begin, end, err := tensorLayout(name, values[i])
		if err != nil {
			return nil, nil, err
		}
		layouts = append(layouts, layout{name, begin, end, shape})
	}

	// The byte ranges must tile the data section: no gap, no overlap, nothing left over.
	sorted := append([]layout(nil), layouts...)
	sort.SliceStable(sorted, func(i, j int) bool {
		if sorted[i].begin != sorted[j].begin {
			return sorted[i].begin < sorted[j].begin
		}
		return sorted[i].end < sorted[j].end
	})
	cursor := 0
	for _, l := range sorted {
		if l.begin != cursor {
			return nil, nil, stErrorf("tensor %q: data_offsets [%d, %d] leave a gap or overlap "+
				"(the previous tensor ends at %d)", l.name, l.begin, l.end, cursor)
		}
		cursor = l.end
	}
	if section := len(data) - start; cursor != section {
		return nil, nil, stErrorf("the data section is %d bytes but its tensors cover %d",
			section, cursor)
	}

	tensors := make(map[string]Tensor, len(layouts))
	for _, l := range layouts {
		raw := data[start+l.begin : start+l.end]
		values := make([]float32, len(raw)/4)
		for i := range values {
			values[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
		tensors[l.name] = Tensor{Shape: l.shape, Data: values}
	}
	return tensors, metadata, nil
}

func decodeMetadataStrings(raw json.RawMessage) (map[string]string, error) {
	if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return nil, nil
	}
	keys, values, err := objectMembers(raw)
	if err != nil {
		return nil, stErrorf("__metadata__ must map strings to strings: %v", err)
	}
	metadata := make(map[string]string, len(keys))
	for i, key := range keys {
		var value string
		if err := json.Unmarshal(values[i], &value); err != nil {
			return nil, stErrorf("__metadata__ must map strings to strings (%q does not)", key)
		}
		metadata[key] = value
	}
	return metadata, nil
}

// tensorLayout reads one header entry and checks it against its dtype and shape.
func tensorLayout(name string, raw json.RawMessage) (shape []int, begin, end int, err error) {
	fail := func(format string, args ...any) ([]int, int, int, error) {
		return nil, 0, 0, stErrorf("tensor %q: "+format, append([]any{name}, args...)...)
	}
	keys, values, err := objectMembers(raw)
	if err != nil {
		return fail("the header entry must be an object: %v", err)
	}
	fields := make(map[string]json.RawMessage, len(keys))
	for i, key := range keys {
		fields[key] = values[i]
	}
	var dtype string
	if err := json.Unmarshal(fields["dtype"], &dtype); err != nil || dtype != stF32 {
		return fail("dtype %s is not supported; only F32 is", bytes.TrimSpace(fields["dtype"]))
	}
	shape, ok := naturals(fields["shape"])
	if !ok {
		return fail("shape must be a list of non-negative integers")
	}
	offsets, ok := naturals(fields["data_offsets"])
	if !ok || len(offsets) != 2 || offsets[0] > offsets[1] {
		return fail("data_offsets must be [begin, end] with 0 <= begin <= end")
	}
	n, err := elements(shape)
	if err != nil {
		return fail("%v", err)
	}
	if offsets[1]-offsets[0] != 4*n {
		return fail("shape %v needs %d bytes, its offsets give %d", shape, 4*n, offsets[1]-offsets[0])
	}
	return shape, offsets[0], offsets[1], nil
}

// naturals reads a JSON array of integers >= 0 (1.0 or 1e0 are not integers here).
func naturals(raw json.RawMessage) ([]int, bool) {
	var numbers []json.Number
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	if raw == nil || decoder.Decode(&numbers) != nil || numbers == nil {
		return nil, false
	}
	out := make([]int, len(numbers))
	for i, number := range numbers {
		v, err := strconv.ParseInt(string(number), 10, 64)
		if err != nil || v < 0 || v > maxElements {
			return nil, false
		}
		out[i] = int(v)
	}
	return out, true
}

// objectMembers splits one JSON object into its member names and raw values, in order, and
// refuses a name given twice (which would silently lose a tensor).
func objectMembers(text []byte) ([]string, []json.RawMessage, error) {
	decoder := json.NewDecoder(bytes.NewReader(text))
	token, err := decoder.Token()
	if err != nil {
		return nil, nil, err
	}
	if delim, ok := token.(json.Delim); !ok || delim != '{' {
		return nil, nil, errors.New("not an object")
	}
	var names []string
	var values []json.RawMessage
	seen := map[string]bool{}
	for decoder.More() {
		token, err := decoder.Token()
		if err != nil {
			return nil, nil, err
		}
		name, ok := token.(string)
		if !ok {
			return nil, nil, errors.New("an object key is not a string")
		}
		if seen[name] {
			return nil, nil, fmt.Errorf("%q is given twice", name)
		}
		seen[name] = true
		var value json.RawMessage
		if err := decoder.Decode(&value); err != nil {
			return nil, nil, err
		}
		names = append(names, name)
		values = append(values, value)
	}
	if _, err := decoder.Token(); err != nil { // the closing brace
		return nil, nil, err
	}
	if _, err := decoder.Token(); err != io.EOF {
		return nil, nil, errors.New("text after the object")
	}
	return names, values, nil
}
