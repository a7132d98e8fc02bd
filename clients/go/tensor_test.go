package optserve

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
)

// Every float32's JSON text reads back as the same float32 both ways: rounded once (as this
// client reads) and through a double first (as Python's json, orjson and JSON.parse read).
// A stride through all bit patterns; the server's suite checks every value exhaustively.
func TestJSONFloat32TextIsExact(t *testing.T) {
	const stride = 1021
	var buf []byte
	check := func(bits uint32) {
		v := math.Float32frombits(bits)
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return
		}
		buf = appendFloat32(buf[:0], v)
		text := string(buf)
		viaDouble, err := strconv.ParseFloat(text, 64)
		if err != nil || math.Float32bits(float32(viaDouble)) != bits {
			t.Fatalf("%08x: %s reads back through a double as %08x", bits, text, math.Float32bits(float32(viaDouble)))
		}
		// Python's json and orjson read a literal without "." or exponent as an int: -0 would
		// lose its sign.
		if !strings.ContainsAny(text, ".eE") && v == 0 && math.Signbit(float64(v)) {
			t.Fatalf("%08x is written as the integer %s", bits, text)
		}
		once, err := parseFloat32(text)
		if err != nil || math.Float32bits(once) != bits {
			t.Fatalf("%08x: %s reads back as %08x", bits, text, math.Float32bits(once))
		}
	}
	for bits := uint64(0); bits <= math.MaxUint32; bits += stride {
		check(uint32(bits))
	}
	for _, bits := range specialBits {
		check(bits)
		check(bits ^ 0x80000000)
	}
}

// The one trap: its shortest float32 text read through a double lands on a tie and rounds to
// the neighbour, so it is written as its double's text instead.
func TestJSONDoubleRoundingTrap(t *testing.T) {
	v := math.Float32frombits(doubleRoundingTrap)
	shortest := strconv.FormatFloat(float64(v), 'g', -1, 32)
	d, _ := strconv.ParseFloat(shortest, 64)
	if math.Float32bits(float32(d)) == doubleRoundingTrap {
		t.Fatalf("%s is no trap", shortest)
	}
	for _, value := range []float32{v, -v} {
		text := string(appendFloat32(nil, value))
		if text == shortest || strings.TrimPrefix(text, "-") == shortest {
			t.Fatalf("the trap is written as %s", text)
		}
		d, _ := strconv.ParseFloat(text, 64)
		if float32(d) != value {
			t.Fatalf("%s reads back as %v", text, float32(d))
		}
	}
}

func TestTensorJSON(t *testing.T) {
	negativeZero := float32(math.Copysign(0, -1))
	tensor := Tensor{Shape: []int{2, 2}, Data: []float32{0.1, negativeZero, 1e-45, 3.4028235e38}}
	text, err := json.Marshal(map[string]Tensor{"w": tensor, "s": Scalar(1.5), "e": Zeros(0)})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"e":{"shape":[0],"data":[]},"s":{"shape":[],"data":[1.5]},` +
		`"w":{"shape":[2,2],"data":[0.1,-0.0,1e-45,3.4028235e+38]}}`
	if string(text) != want {
		t.Fatalf("got %s\nwant %s", text, want)
	}
	var back map[string]Tensor
	if err := json.Unmarshal(text, &back); err != nil {
		t.Fatal(err)
	}
	if !sameTensor(back["w"], tensor) || !sameTensor(back["s"], Scalar(1.5)) || back["e"].Len() != 0 {
		t.Fatalf("round trip: %+v", back)
	}
	// The shape of a tensor without one is that of a scalar.
	if _, err := json.Marshal(Tensor{Data: []float32{1, 2}}); err == nil {
		t.Fatal("data of 2 values with a scalar shape encoded")
	}
	for _, bad := range []float32{float32(math.NaN()), float32(math.Inf(-1))} {
		if _, err := json.Marshal(NewTensor([]float32{bad})); err == nil {
			t.Fatalf("%v encoded as JSON", bad)
		}
	}
	for _, text := range []string{
		`{"shape":[2],"data":[1]}`, `{"shape":[1]}`, `{"data":[1]}`, `{"shape":[1.5],"data":[1]}`,
		`{"shape":[-1],"data":[]}`, `{"shape":[1],"data":["1"]}`, `{"shape":[1],"data":[1],"dtype":"float16"}`,
		`[1]`,
	} {
		var tensor Tensor
		if err := json.Unmarshal([]byte(text), &tensor); err == nil {
			t.Errorf("%s decoded", text)
		}
	}
	// Beyond float32's range is +-Inf (IEEE rounding), as the server reads it.
	var big Tensor
	if err := json.Unmarshal([]byte(`{"shape":[2],"data":[1e39,-1e39]}`), &big); err != nil ||
		!math.IsInf(float64(big.Data[0]), 1) || !math.IsInf(float64(big.Data[1]), -1) {
		t.Fatalf("%v %v", big, err)
	}
}

func TestIdempotencyKeysAreRandomUUIDs(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		key := newIdempotencyKey()
		if len(key) != 36 || key[14] != '4' || !strings.ContainsRune("89ab", rune(key[19])) || seen[key] {
			t.Fatalf("bad or repeated key %s", key)
		}
		seen[key] = true
	}
}
