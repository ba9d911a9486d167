# Example values: replace every id, ARN and CIDR with your own. `terraform plan` is the first
# check that can see your account; see README.md for what was validated offline.
region = "eu-west-1"
name   = "meshgate"

vpc_id     = "vpc-0a1b2c3d4e5f60718"
subnet_ids = ["subnet-0a1b2c3d4e5f60711", "subnet-0a1b2c3d4e5f60722", "subnet-0a1b2c3d4e5f60733"]

# The VMs: their VPCs get the private zones, their CIDRs may use the NLB.
vm_vpc_ids = ["vpc-0a1b2c3d4e5f60718", "vpc-0f1e2d3c4b5a69788"]
vm_cidrs   = ["10.20.0.0/16", "10.30.0.0/16"]

mesh_zone_names = ["svc.cluster.local"]

# Istio: the east-west gateway (infra/istio/eastwest-gateway) and meshgate's identity
# (infra/istio/identity). The AuthorizationPolicies in infra/istio/authorization name this
# identity as cluster.local/ns/meshgate/sa/meshgate.
mesh_gateways      = ["eastwest.mesh.example.internal:15443"]
mesh_gateway_cidrs = ["10.0.0.0/16"]
trust_domain       = "cluster.local"
spiffe_id          = "spiffe://cluster.local/ns/meshgate/sa/meshgate"

services = {
  reviews = {
    host     = "reviews.bookinfo.svc.cluster.local"
    port     = 9080
    protocol = "http2"
  }
  ratings = {
    host     = "ratings.bookinfo.svc.cluster.local"
    port     = 9080
    protocol = "http1"
    identity = ["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"]
  }
  payments-v2 = {
    host     = "payments.billing.svc.cluster.local"
    port     = 8443
    protocol = "http2"
    subset   = "v2"
    aliases  = ["payments-v2.billing.svc.cluster.local"]
  }
}

tenants = {
  billing-vms = {
    sources = ["10.20.0.0/16"]
    allow   = ["payments-v2", "ratings"]
    rate_limit = {
      requests_per_second = 200
      burst               = 400
    }
  }
  batch = {
    sources                 = ["10.30.0.0/16"]
    allow                   = ["reviews"]
    max_concurrent_requests = 64
  }
  laptops = {
    # `meshgate hash-key` prints a new key and this digest form of it.
    api_keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    allow    = ["*"]
  }
}

# The other direction (infra/istio/inbound): mesh workloads call billing.vms.internal:8080, which
# runs on the billing VMs, through meshgate's mesh-inbound listener on the NLB's port 15443.
# source_cidrs: the cluster's pods and east-west gateway; meshgate admits only the callers in
# allow, by their SPIFFE IDs (the VMs have no sidecar to enforce AuthorizationPolicies).
mesh_inbound = {
  port          = 15443
  source_cidrs  = ["10.0.0.0/16"]
  backend_cidrs = ["10.20.1.0/24"]
}

vm_services = {
  billing = {
    hosts    = ["billing.vms.internal"]
    port     = 8080
    protocol = "http1"
    backends = ["10.20.1.5:8080", "10.20.1.6:8080"]
    allow    = ["spiffe://cluster.local/ns/shop/sa/cart", "ns/bookinfo/*"]
  }
}

ami_id                   = "ami-0123456789abcdef0"
# The portable binaries of `bash scripts/release.sh` (dist/meshgate, dist/meshgate-autoscaler:
# glibc 2.17+, so Amazon Linux 2 and 2023 both run them), uploaded as they are; the checksums are
# their lines in dist/SHA256SUMS (these are from one build of 0.1.0: put your own build's here).
# The bootstrap refuses any other file.
meshgate_binary_s3_uri   = "s3://example-artifacts/meshgate/0.1.0/meshgate"
meshgate_binary_sha256   = "32b247744b3e58359872f9328674f3d4de9cb41b749b163c82a1957e4b8342c5"
autoscaler_binary_s3_uri = "s3://example-artifacts/meshgate/0.1.0/meshgate-autoscaler"
autoscaler_binary_sha256 = "6b97205d8595886f125142cb3527381d283d80194f8f1800e6d9a12448494bea"
identity_secret_arn      = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:meshgate/identity-AbCdEf"

monitoring_security_group_ids = ["sg-0a1b2c3d4e5f60799"]
prometheus_url                = "http://prometheus.monitoring.internal:9090"
prometheus_cidrs              = ["10.0.200.0/24"]

min_size          = 2
max_size          = 12
autoscaler_target = 25

tags = {
  project = "meshgate"
}
