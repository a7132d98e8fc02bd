package optserve

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

func fromBits(bits ...uint32) []float32 {
	out := make([]float32, len(bits))
	for i, b := range bits {
		out[i] = math.Float32frombits(b)
	}
	return out
}

func toBits(values []float32) []uint32 {
	out := make([]uint32, len(values))
	for i, v := range values {
		out[i] = math.Float32bits(v)
	}
	return out
}

// sameTensor: the same shape and the same bits (-0.0 vs 0.0 and NaN payloads count).
func sameTensor(a, b Tensor) bool {
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

// specialBits: signed zeros, NaN payloads, infinities, subnormals, extremes, the JSON trap.
var specialBits = []uint32{
	0x00000000, 0x80000000, 0x7fc00000, 0x7fc00001, 0xffffffff, 0x7f800000, 0xff800000,
	0x00000001, 0x807fffff, 0x7f7fffff, 0xff7fffff, 0x15ae43fd, 0x3f800000, 0x3dcccccd,
	0xc0600000, 0x3eaaaaab,
}

func randomBits(rng *rand.Rand, n int) []float32 {
	bits := make([]uint32, n)
	for i := range bits {
		bits[i] = rng.Uint32()
	}
	return fromBits(bits...)
}

func TestSafetensorsRoundTripAndLayout(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	tensors := map[string]Tensor{
		"w":      {Shape: []int{4, 4}, Data: fromBits(specialBits...)},
		"b":      {Shape: []int{3}, Data: randomBits(rng, 3)},
		"scalar": Scalar(2.5),
		"empty":  {Shape: []int{2, 0, 3}, Data: []float32{}},
	}
	metadata := map[string]string{"version": "3", "worker": `"a"`}
	data, err := EncodeSafetensors(tensors, metadata)
	if err != nil {
		t.Fatal(err)
	}
	headerLen := binary.LittleEndian.Uint64(data)
	if headerLen%8 != 0 {
		t.Fatalf("header of %d bytes is not padded to a multiple of 8", headerLen)
	}
	header := data[8 : 8+headerLen]
	if !bytes.HasPrefix(header, []byte(`{"__metadata__":{"version":"3","worker":"\"a\""},"b":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}`)) {
		t.Fatalf("unexpected header %s", header)
	}
	if trimmed := bytes.TrimRight(header, " "); len(header)-len(trimmed) >= 8 || !json.Valid(trimmed) {
		t.Fatalf("padding: %q", header)
	}
	decoded, meta, err := DecodeSafetensors(data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(meta, metadata) {
		t.Fatalf("metadata %v", meta)
	}
	if len(decoded) != len(tensors) {
		t.Fatalf("decoded %d tensors", len(decoded))
	}
	for name, want := range tensors {
		if !sameTensor(decoded[name], want) {
			t.Errorf("%s: got %v %v want %v %v", name, decoded[name].Shape, toBits(decoded[name].Data), want.Shape, toBits(want.Data))
		}
	}

	// No metadata map: no __metadata__ entry; an empty one: an empty object (as the package).
	none, _ := EncodeSafetensors(map[string]Tensor{"x": Scalar(1)}, nil)
	empty, _ := EncodeSafetensors(map[string]Tensor{"x": Scalar(1)}, map[string]string{})
	if bytes.Contains(none, []byte(MetadataKey)) || !bytes.Contains(empty, []byte(`{"__metadata__":{},"x"`)) {
		t.Fatalf("metadata entry: %q / %q", none, empty)
	}
	if _, meta, _ := DecodeSafetensors(none); meta != nil {
		t.Fatalf("metadata of a file without one: %v", meta)
	}
}

func TestSafetensorsEncodeRefuses(t *testing.T) {
	cases := map[string]map[string]Tensor{
		"reserved name":  {MetadataKey: Scalar(1)},
		"short data":     {"x": {Shape: []int{3}, Data: []float32{1}}},
		"negative shape": {"x": {Shape: []int{-1}, Data: nil}},
		"bad utf-8":      {"\xff": Scalar(1)},
	}
	for name, tensors := range cases {
		if _, err := EncodeSafetensors(tensors, nil); err == nil {
			t.Errorf("%s: encoded", name)
		}
	}
}

// raw builds a safetensors body from a header text and a data section.
func raw(header string, data []byte) []byte {
	out := make([]byte, 8, 8+len(header)+len(data))
	binary.LittleEndian.PutUint64(out, uint64(len(header)))
	return append(append(out, header...), data...)
}

func TestSafetensorsDecodeRefusesMalformed(t *testing.T) {
	four := make([]byte, 4)
	eight := make([]byte, 8)
	cases := map[string][]byte{
		"shorter than the length": {1, 2, 3},
		"header past the end":     append([]byte{0xff, 0, 0, 0, 0, 0, 0, 0}, "{}"...),
		"huge header":             {0, 0, 0, 0, 0, 0, 0, 1},
		"not an object":           raw(`[1]`, nil),
		"not json":                raw(`{"x":`, nil),
		"text after":              raw(`{} {}`, nil),
		"bad utf-8":               raw("{\"\xff\":1}", nil),
		"wrong dtype":             raw(`{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}`, four),
		"negative dim":            raw(`{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}`, four),
		"float dim":               raw(`{"x":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}`, four),
		"offsets vs shape":        raw(`{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}`, four),
		"reversed offsets":        raw(`{"x":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}`, four),
		"gap":                     raw(`{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, eight),
		"overlap": raw(`{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},`+
			`"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, four),
		"trailing bytes":     raw(`{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, eight),
		"short data":         raw(`{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, four),
		"name twice":         raw(`{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, eight),
		"metadata not str":   raw(`{"__metadata__":{"a":1}}`, nil),
		"metadata key twice": raw(`{"__metadata__":{"a":"1","a":"2"}}`, nil),
		"offsets missing":    raw(`{"x":{"dtype":"F32","shape":[1]}}`, four),
	}
	names := make([]string, 0, len(cases))
	for name := range cases {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		_, _, err := DecodeSafetensors(cases[name])
		if err == nil {
			t.Errorf("%s: decoded", name)
			continue
		}
		if _, ok := err.(*SafetensorsError); !ok {
			t.Errorf("%s: %T %v", name, err, err)
		}
	}
	// Unordered offsets that still tile the section are fine.
	ok := raw(`{"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, eight)
	if _, _, err := DecodeSafetensors(ok); err != nil {
		t.Fatal(err)
	}
}

// -- fixtures shared with the Python safetensors package (tests/test_go_client.py) ----------------

// fixtureTensor is a tensor in the fixtures' expectation files: shape and float32 bit patterns.
type fixtureTensor struct {
	Shape []int    `json:"shape"`
	Bits  []uint32 `json:"bits"`
}

type fixtureCase struct {
	Tensors  map[string]fixtureTensor `json:"tensors"`
	Metadata map[string]string        `json:"metadata"`
}

func fixturesDir(t *testing.T) string {
	dir := os.Getenv("OPTSERVE_ST_FIXTURES")
	if dir == "" {
		t.Skip("OPTSERVE_ST_FIXTURES is not set (tests/test_go_client.py sets it)")
	}
	return dir
}

// Files written by the Python safetensors package decode to exactly the expected bits, and
// encoding them again gives the very same bytes.
func TestSafetensorsPythonFixtures(t *testing.T) {
	dir := filepath.Join(fixturesDir(t), "py")
	files, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no Python fixtures in %s (%v)", dir, err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".safetensors")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			var want fixtureCase
			text, err := os.ReadFile(filepath.Join(dir, name+".json"))
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(text, &want); err != nil {
				t.Fatal(err)
			}
			tensors, metadata, err := DecodeSafetensors(data)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(metadata, want.Metadata) {
				t.Errorf("metadata %q, want %q", metadata, want.Metadata)
			}
			if len(tensors) != len(want.Tensors) {
				t.Errorf("%d tensors, want %d", len(tensors), len(want.Tensors))
			}
			for tensorName, spec := range want.Tensors {
				expected := Tensor{Shape: spec.Shape, Data: fromBits(spec.Bits...)}
				if !sameTensor(tensors[tensorName], expected) {
					t.Errorf("%q: got %v %x, want %v %x", tensorName, tensors[tensorName].Shape,
						toBits(tensors[tensorName].Data), spec.Shape, spec.Bits)
				}
			}
			again, err := EncodeSafetensors(tensors, metadata)
			if err != nil {
				t.Fatal(err)
			}
			if err := sameSafetensors(again, data, len(metadata) <= 1); err != nil {
				t.Errorf("re-encoded bytes differ from the package's: %v\n go: %q\n py: %q", err, again, data)
			}
		})
	}
	// The server's JSON floats (orjson's shortest float32 texts) read back bit-exact.
	text, err := os.ReadFile(filepath.Join(dir, "floats_server.json"))
	if err != nil {
		t.Fatal(err)
	}
	var fromServer map[string]Tensor
	if err := json.Unmarshal(text, &fromServer); err != nil {
		t.Fatal(err)
	}
	var want map[string]fixtureTensor
	bitsText, err := os.ReadFile(filepath.Join(dir, "floats_server.bits.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(bitsText, &want); err != nil {
		t.Fatal(err)
	}
	for name, spec := range want {
		if !sameTensor(fromServer[name], Tensor{Shape: spec.Shape, Data: fromBits(spec.Bits...)}) {
			t.Errorf("server JSON tensor %q does not read back bit-exact", name)
		}
	}
}

// sameSafetensors: the same header length (so the same padding), the same data section and
// the same header; byte for byte when exact. The package writes the metadata keys in the order
// of a Rust HashMap, which differs from run to run, so with two keys or more only the parsed
// headers can be compared (this encoder sorts them).
func sameSafetensors(a, b []byte, exact bool) error {
	if exact {
		if !bytes.Equal(a, b) {
			return errors.New("the bytes differ")
		}
		return nil
	}
	if len(a) < 8 || len(b) < 8 || !bytes.Equal(a[:8], b[:8]) || len(a) != len(b) {
		return errors.New("the header lengths or sizes differ")
	}
	n := 8 + binary.LittleEndian.Uint64(a)
	if !bytes.Equal(a[n:], b[n:]) {
		return errors.New("the data sections differ")
	}
	var headerA, headerB any
	if json.Unmarshal(a[8:n], &headerA) != nil || json.Unmarshal(b[8:n], &headerB) != nil ||
		!reflect.DeepEqual(headerA, headerB) {
		return errors.New("the headers differ")
	}
	return nil
}

// goFixtures are what the Go encoder writes for the Python package to read.
func goFixtures() map[string]struct {
	tensors  map[string]Tensor
	metadata map[string]string
} {
	rng := rand.New(rand.NewSource(20240611))
	type fixture = struct {
		tensors  map[string]Tensor
		metadata map[string]string
	}
	return map[string]fixture{
		"special": {
			tensors:  map[string]Tensor{"special": {Shape: []int{4, 4}, Data: fromBits(specialBits...)}},
			metadata: map[string]string{"version": "7", "applied": "true"},
		},
		"shapes": {
			tensors: map[string]Tensor{
				"scalar": Scalar(-1.25),
				"empty":  {Shape: []int{0}, Data: []float32{}},
				"empty3": {Shape: []int{2, 0, 3}, Data: []float32{}},
				"row":    {Shape: []int{1, 5}, Data: randomBits(rng, 5)},
				"cube":   {Shape: []int{2, 3, 4}, Data: randomBits(rng, 24)},
				"big":    {Shape: []int{257, 3}, Data: randomBits(rng, 771)},
			},
			metadata: map[string]string{"params": `{"a":[1,2.5,null]}`},
		},
		"names": {
			tensors: map[string]Tensor{
				"a/b": Scalar(1), "ä ß": Scalar(2), `quote"back\slash`: Scalar(3),
				"tab\tnl\n": Scalar(4), "B": Scalar(5), "a": Scalar(6), "€uro": Scalar(7),
				"<html>&": Scalar(8),
			},
			metadata: map[string]string{
				"base_version": "12", "worker": `"w-1"`, "ctl": "\b\f\x01\x1f\x7f",
				"html": "<a&b>", "seps": "\u2028\u2029", "ünï": "cödé", "": "empty key",
			},
		},
		"nometa":    {tensors: map[string]Tensor{"x": NewTensor([]float32{1, 2, 3})}},
		"emptymeta": {tensors: map[string]Tensor{"x": NewTensor([]float32{1, 2, 3})}, metadata: map[string]string{}},
		"onlymeta":  {tensors: map[string]Tensor{}, metadata: map[string]string{"a": "1"}},
	}
}

// The Go encoder's files, with their expected bits, for the Python package to load and check;
// and the Go JSON encoder's floats, for Python's json (a double reader) to check.
func TestSafetensorsWriteGoFixtures(t *testing.T) {
	dir := filepath.Join(fixturesDir(t), "go")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, fixture := range goFixtures() {
		data, err := EncodeSafetensors(fixture.tensors, fixture.metadata)
		if err != nil {
			t.Fatal(name, err)
		}
		expect := fixtureCase{Tensors: map[string]fixtureTensor{}, Metadata: fixture.metadata}
		for tensorName, tensor := range fixture.tensors {
			expect.Tensors[tensorName] = fixtureTensor{Shape: tensor.Shape, Bits: toBits(tensor.Data)}
		}
		writeFixture(t, filepath.Join(dir, name+".safetensors"), data)
		text, err := json.Marshal(expect)
		if err != nil {
			t.Fatal(err)
		}
		writeFixture(t, filepath.Join(dir, name+".json"), text)
	}

	rng := rand.New(rand.NewSource(99))
	finite := func(values []float32) []float32 {
		for i, v := range values {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				values[i] = 1.5
			}
		}
		return values
	}
	floats := map[string]Tensor{
		"special": NewTensor(finite(fromBits(specialBits...))),
		"random":  {Shape: []int{100, 100}, Data: finite(randomBits(rng, 10000))},
		"trap":    NewTensor(fromBits(0x15ae43fd, 0x95ae43fd, 0x15ae43fe)),
	}
	text, err := json.Marshal(floats)
	if err != nil {
		t.Fatal(err)
	}
	writeFixture(t, filepath.Join(dir, "floats.json"), text)
	bits := map[string]fixtureTensor{}
	for name, tensor := range floats {
		bits[name] = fixtureTensor{Shape: tensor.Shape, Bits: toBits(tensor.Data)}
	}
	text, _ = json.Marshal(bits)
	writeFixture(t, filepath.Join(dir, "floats.bits.json"), text)
}

func writeFixture(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}
