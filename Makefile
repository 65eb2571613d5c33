# rayvmm build and test entry points. See README.md.
GO ?= go
export CGO_ENABLED = 0
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: all rayvmm rayvmm-vm rayvmmd guestkernel test test-repeat unit integration bench vet fmt clean

all: rayvmm rayvmm-vm rayvmmd

# rayvmm is the CLI and control plane; rayvmm-vm the VM process it starts
# for each guest (found next to rayvmm); rayvmmd the pods daemon and
# everything that links etcd (sharded volumes), which rayvmm runs for those
# commands: it links what the CLI must not.
rayvmm:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/rayvmm ./cmd/rayvmm

rayvmm-vm:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/rayvmm-vm ./cmd/rayvmm-vm

rayvmmd:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/rayvmmd ./cmd/rayvmmd

# make guestkernel: rebuild rayguest from scratch, rewriting
# guestkernel/rayguest.elf and guestkernel/toolchain.txt (commit both).
guestkernel:
	$(MAKE) -C guestkernel clean all

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

# make test: every test (unit, fuzz seed corpora, integration on /dev/kvm).
test: rayvmm rayvmm-vm rayvmmd vet
	$(GO) test -count=1 -timeout 30m ./...

# make test-repeat [N=5]: the whole suite N times over (each a separate
# go test -json run), then each test's failure count; fails if any test
# failed even once. For hunting flaky tests; CI does not run it.
N ?= 5
test-repeat:
	$(GO) run ./internal/testrepeat -n $(N) -- -timeout 30m ./...

# make bench: side-by-side benchmarks (tests/bench); writes
# tests/bench/results and the README's Performance section. Needs root.
bench: rayvmm rayvmm-vm rayvmmd
	$(GO) run ./tests/bench $(BENCHFLAGS)

clean:
	rm -rf bin

# Debian's stock kernel for the Linux boot test (tests/linux_test.go) and the
# bzImage loader test: the package is downloaded and unpacked into
# build/linux, nothing is installed.
LINUX_DIR := build/linux
linux-kernel: $(LINUX_DIR)/.done
$(LINUX_DIR)/.done:
	rm -rf $(LINUX_DIR) && mkdir -p $(LINUX_DIR)
	cd $(LINUX_DIR) && apt-get download linux-image-amd64 && \
		dep=$$(dpkg-deb -f linux-image-amd64_*.deb Depends | sed 's/[ ,(].*//') && \
		apt-get download $$dep && dpkg-deb -x $${dep}_*.deb root && rm -f *.deb
	ls $(LINUX_DIR)/root/boot/vmlinuz-* >/dev/null
	touch $@
.PHONY: linux-kernel
