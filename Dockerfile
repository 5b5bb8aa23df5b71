# stund: a small static image that runs as non-root.
#
#   docker build --build-arg VERSION=$(git describe --always --dirty) -t stund .
#   docker run --network host stund --primary-ip 192.0.2.10 --alternate-ip 192.0.2.11 \
#       --auth-secret "$TURN_SECRET" --metrics 127.0.0.1:9641
#
# Host networking is the deployment this image is made for: RFC 5780 needs
# the two real addresses of the host (a bridged container sees one private
# address, and NAT in front of a STUN server falsifies every answer), and the
# relay range (default 49152-65535/udp) is too wide to publish port by port.

# --- build: static binary, no cgo, reproducible paths ---
FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first: this layer is cached until go.mod/go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath \
        -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/stund ./cmd/stund

# --- run: distroless static (CA certificates, tzdata, /etc/passwd with
# the nonroot user 65532; no shell, no package manager) ---
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/stund /usr/local/bin/stund
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# STUN/TURN on the primary port (UDP and TCP), the RFC 5780 alternate port,
# TURN over TLS, and the admin listener (/metrics /healthz /readyz) when
# --metrics is set. Relayed addresses use --relay-ports (default
# 49152-65535/udp): open that range in the firewall, it is not listed here.
EXPOSE 3478/udp 3478/tcp 3479/udp 5349/tcp 9641/tcp
ENTRYPOINT ["/usr/local/bin/stund"]
