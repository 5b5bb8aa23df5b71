# Top-level targets. `make natlab` needs root (network namespaces).

.PHONY: natlab

# PROFILE=name[,name] runs only those profiles (go run ./lab/natlab -list).
PROFILE ?=
# NATLAB_FLAGS passes more flags, e.g. NATLAB_FLAGS='-checks lab -j 2'.
NATLAB_FLAGS ?=

natlab:
	go run ./lab/natlab $(if $(PROFILE),-profile $(PROFILE)) $(NATLAB_FLAGS)
