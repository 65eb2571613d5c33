package main

import "errors"

func builtinKernel() ([]byte, error) {
	return nil, errors.New("no --kernel given and the built-in guest kernel is not built yet")
}
