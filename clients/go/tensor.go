package optserve

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
)

// Tensor is a float32 tensor: Data holds prod(Shape) values, flat and row-major. An empty Shape
// is a scalar (one value); a dimension of 0 makes an empty tensor.
//
// In JSON a Tensor is {"shape": [2, 3], "data": [...]}, each value written as the shortest
// decimal that reads back as the same float32, also through a reader that parses a double first.
type Tensor struct {
	Shape []int
	Data  []float32
}

// NewTensor wraps data (not copied) with the given shape; without a shape it is one-dimensional.
func NewTensor(data []float32, shape ...int) Tensor {
	if len(shape) == 0 {
		shape = []int{len(data)}
	}
	return Tensor{Shape: append([]int(nil), shape...), Data: data}
}

// Zeros is a zero-filled tensor of the given shape (no shape: a scalar).
func Zeros(shape ...int) Tensor {
	n, err := elements(shape)
	if err != nil {
		panic("optserve.Zeros: " + err.Error())
	}
	return Tensor{Shape: append([]int{}, shape...), Data: make([]float32, n)}
}

// Scalar is a 0-dimensional tensor holding v.
func Scalar(v float32) Tensor {
	return Tensor{Shape: []int{}, Data: []float32{v}}
}

// Len is the number of values the shape calls for.
func (t Tensor) Len() int {
	n, err := elements(t.Shape)
	if err != nil {
		return -1
	}
	return n
}

// Validate checks that the shape is non-negative and that Data has exactly prod(Shape) values.
func (t Tensor) Validate() error {
	n, err := elements(t.Shape)
	if err != nil {
		return err
	}
	if len(t.Data) != n {
		return fmt.Errorf("shape %v needs %d values, data has %d", t.Shape, n, len(t.Data))
	}
	return nil
}

// maxElements keeps prod(shape)*4 bytes representable.
const maxElements = math.MaxInt64 / 8

// elements is prod(shape), refusing negative dimensions and overflow.
func elements(shape []int) (int, error) {
	n := 1
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("shape %v has a negative dimension", shape)
		}
		if d != 0 && n > maxElements/d {
			return 0, fmt.Errorf("shape %v is too large", shape)
		}
		n *= d
	}
	return n, nil
}

// doubleRoundingTrap is the one float32 magnitude (bits 0x15ae43fd) whose shortest float32 text
// (7.038531e-26) lands, parsed as a double, exactly on the tie between two float32s, so readers
// that parse a double and then round (Python's json, orjson, JSON.parse) get its neighbour. The
// server's test suite checks every positive float32 and finds only this one; it is written as
// the exact decimal of its double widening instead, which every reader parses exactly.
const doubleRoundingTrap = 0x15ae43fd

// appendFloat32 appends the JSON text of a finite float32.
func appendFloat32(b []byte, v float32) []byte {
	if v == 0 && math.Signbit(float64(v)) {
		// "-0" is an integer to Python's json and orjson, which read it as 0 and lose the sign.
		return append(b, "-0.0"...)
	}
	if math.Float32bits(v)&0x7fffffff == doubleRoundingTrap {
		return strconv.AppendFloat(b, float64(v), 'g', -1, 64)
	}
	return strconv.AppendFloat(b, float64(v), 'g', -1, 32)
}

// parseFloat32 reads a JSON number as the float32 nearest to it, rounding once (a double first
// could round twice). Beyond float32's range it is +-Inf, as IEEE rounding says.
func parseFloat32(text string) (float32, error) {
	v, err := strconv.ParseFloat(text, 32)
	if err != nil {
		var numErr *strconv.NumError
		if errors.As(err, &numErr) && numErr.Err == strconv.ErrRange {
			return float32(v), nil
		}
		return 0, err
	}
	return float32(v), nil
}

// appendTensorJSON writes {"shape": [...], "data": [...]}; NaN and infinities have no JSON text.
func appendTensorJSON(b []byte, t Tensor) ([]byte, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	b = append(b, `{"shape":[`...)
	for i, d := range t.Shape {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, int64(d), 10)
	}
	b = append(b, `],"data":[`...)
	for i, v := range t.Data {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, fmt.Errorf("data[%d] is %v, which JSON cannot carry; use the safetensors codec", i, v)
		}
		if i > 0 {
			b = append(b, ',')
		}
		b = appendFloat32(b, v)
	}
	return append(b, "]}"...), nil
}

// MarshalJSON writes {"shape", "data"} with float32-exact decimals.
func (t Tensor) MarshalJSON() ([]byte, error) {
	return appendTensorJSON(make([]byte, 0, 32+12*len(t.Data)), t)
}

// UnmarshalJSON reads {"shape", "data"}; every number is rounded to float32 once.
func (t *Tensor) UnmarshalJSON(text []byte) error {
	var raw struct {
		Shape *[]int             `json:"shape"`
		Data  *[]json.RawMessage `json:"data"`
		DType *string            `json:"dtype"`
	}
	if err := json.Unmarshal(text, &raw); err != nil {
		return fmt.Errorf("not a tensor object {\"shape\", \"data\"}: %w", err)
	}
	if raw.Shape == nil || raw.Data == nil {
		return errors.New(`a tensor object needs "shape" and "data"`)
	}
	if raw.DType != nil && *raw.DType != "float32" {
		return fmt.Errorf("dtype %q is not supported (float32 only)", *raw.DType)
	}
	n, err := elements(*raw.Shape)
	if err != nil {
		return err
	}
	if len(*raw.Data) != n {
		return fmt.Errorf("shape %v needs %d values, data has %d", *raw.Shape, n, len(*raw.Data))
	}
	data := make([]float32, n)
	for i, number := range *raw.Data {
		// The JSON is valid, so only a number parses (a string, true or null does not).
		v, err := parseFloat32(string(number))
		if err != nil {
			return fmt.Errorf("data[%d] is not a number: %s", i, number)
		}
		data[i] = v
	}
	t.Shape, t.Data = *raw.Shape, data
	return nil
}
