# Inputs of the meshgate fleet. Keys that end up in meshgate.yaml follow docs/config.md (the
# config keys are a contract); templates/meshgate.yaml.tftpl is the only place they are written.

variable "name" {
  type        = string
  description = "Name of the fleet: the Auto Scaling group, the NLB and the prefix of every other resource. Lower-case letters, digits and '-', at most 26 characters (the target groups append '-proxy' and '-mesh')."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,25}$", var.name))
    error_message = "name: lower-case letters, digits and '-', starting with a letter, at most 26 characters."
  }
}

variable "vpc_id" {
  type        = string
  description = "The VPC the fleet and its internal NLB run in."

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  type        = list(string)
  description = "Existing private subnets (one per availability zone) for the NLB and the Auto Scaling group. Their CIDRs become meshgate's trusted_proxies when proxy_protocol_v2 is on."

  validation {
    condition     = length(var.subnet_ids) >= 1 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids: at least one subnet id (subnet-…); use two or more for availability."
  }
}

variable "vm_cidrs" {
  type        = list(string)
  description = "IPv4 CIDRs of the VMs that call the mesh: the only sources allowed on the NLB listeners (and on the proxy port when client IPs are preserved)."

  validation {
    condition     = length(var.vm_cidrs) >= 1 && alltrue([for c in var.vm_cidrs : can(cidrhost(c, 0)) && !strcontains(c, ":")])
    error_message = "vm_cidrs: at least one IPv4 CIDR such as 10.20.0.0/16."
  }
}

variable "admin_source_security_group_ids" {
  type        = list(string)
  description = "Existing security groups (monitoring, Prometheus) allowed to reach meshgate's admin port (/metrics, /readyz, /drain). The module also creates admin_client_security_group_id for the same purpose."
  default     = []

  validation {
    condition     = alltrue([for s in var.admin_source_security_group_ids : can(regex("^sg-[0-9a-f]+$", s))])
    error_message = "admin_source_security_group_ids: security group ids (sg-…)."
  }
}

variable "mesh_gateways" {
  type        = list(string)
  description = "The Istio east-west gateway(s) in AUTO_PASSTHROUGH mode as host:port (meshgate's mesh.gateway), usually port 15443."

  validation {
    condition     = length(var.mesh_gateways) >= 1 && alltrue([for g in var.mesh_gateways : can(regex("^[A-Za-z0-9.-]+:[0-9]{1,5}$", g))])
    error_message = "mesh_gateways: one or more host:port, e.g. eastwest.mesh.example.com:15443."
  }
}

variable "mesh_gateway_cidrs" {
  type        = list(string)
  description = "IPv4 CIDRs where the east-west gateway's load balancer lives: the instances may connect there on the gateway port(s)."

  validation {
    condition     = length(var.mesh_gateway_cidrs) >= 1 && alltrue([for c in var.mesh_gateway_cidrs : can(cidrhost(c, 0))])
    error_message = "mesh_gateway_cidrs: at least one CIDR."
  }
}

variable "https_egress_cidrs" {
  type        = list(string)
  description = "CIDRs the instances may reach on 443 at boot and for identity refresh (S3, Secrets Manager, SSM, KMS, the binary URL). Narrow it to VPC endpoint subnets when you have them."
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for c in var.https_egress_cidrs : can(cidrhost(c, 0))])
    error_message = "https_egress_cidrs: CIDRs."
  }
}

variable "trust_domain" {
  type        = string
  description = "The mesh trust domain (meshgate's mesh.trust_domain)."
  default     = "cluster.local"

  validation {
    condition     = can(regex("^[a-z0-9.-]+$", var.trust_domain))
    error_message = "trust_domain: lower-case DNS-like name, e.g. cluster.local."
  }
}

variable "spiffe_id" {
  type        = string
  description = "meshgate's workload identity, spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT. The identity fetcher refuses a certificate without this URI SAN; the Vault agent requests it. Mesh AuthorizationPolicies name it as TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT."

  validation {
    condition     = can(regex("^spiffe://[a-z0-9.-]+/ns/[a-z0-9-]+/sa/[a-z0-9-]+$", var.spiffe_id))
    error_message = "spiffe_id must be spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT."
  }
}

variable "services" {
  type = map(object({
    host     = string
    port     = number
    protocol = string
    subset   = optional(string)
    identity = optional(list(string))
    aliases  = optional(list(string), [])
  }))
  description = "Mesh services meshgate exposes (meshgate's services map). port is the Kubernetes Service port (part of the SNI outbound_.PORT_.SUBSET_.HOST) and also an NLB listener port; host and aliases get DNS records from the dns module."

  validation {
    condition     = length(var.services) >= 1 && alltrue([for k, s in var.services : can(regex("^[a-z0-9_-]+$", k)) && s.port >= 1 && s.port <= 65535 && contains(["http1", "http2"], s.protocol) && can(regex("^[a-z0-9.-]+$", s.host))])
    error_message = "services: names of lower-case letters, digits, '-' and '_'; port 1-65535; protocol http1 or http2; host a lower-case DNS name."
  }
}

variable "tenants" {
  type = map(object({
    sources  = optional(list(string), [])
    api_keys = optional(list(string), [])
    allow    = list(string)
    vpce     = optional(list(string), [])
    rate_limit = optional(object({
      requests_per_second = number
      burst               = optional(number)
    }))
    max_concurrent_requests = optional(number)
  }))
  description = "Callers and what they may reach (meshgate's tenants map): sources CIDRs and/or api_keys as sha256:HEX digests from `meshgate hash-key`, allow = service names or \"*\"."

  validation {
    condition     = length(var.tenants) >= 1 && alltrue([for k, t in var.tenants : can(regex("^[a-z0-9_-]+$", k)) && length(t.sources) + length(t.api_keys) > 0 && alltrue([for key in t.api_keys : can(regex("^sha256:[0-9a-f]{64}$", key))])])
    error_message = "tenants: names of lower-case letters, digits, '-' and '_'; each tenant needs sources or api_keys; api_keys are sha256:<64 hex> digests, never plaintext keys."
  }
}

variable "mesh_inbound" {
  type = object({
    port          = optional(number, 15443)
    source_cidrs  = list(string)
    backend_cidrs = list(string)
  })
  description = "The mesh → VM direction, off when null: meshgate's mesh-inbound listener on port (on the instances and as an NLB listener of its own), where mesh sidecars send Istio mTLS for vm_services (infra/istio/inbound: the ServiceEntry targetPort, or the network gateway port). source_cidrs: the mesh's pod and east-west gateway CIDRs, the only sources allowed on that port. backend_cidrs: where the vm_services' backends live; the instances may connect there on the backends' ports."
  default     = null

  validation {
    condition = var.mesh_inbound == null ? true : (
      var.mesh_inbound.port >= 1 && var.mesh_inbound.port <= 65535 &&
      length(var.mesh_inbound.source_cidrs) >= 1 && length(var.mesh_inbound.backend_cidrs) >= 1 &&
      alltrue([for c in concat(var.mesh_inbound.source_cidrs, var.mesh_inbound.backend_cidrs) : can(cidrhost(c, 0)) && !strcontains(c, ":")])
    )
    error_message = "mesh_inbound: port 1-65535, at least one IPv4 CIDR in source_cidrs and in backend_cidrs."
  }
}

variable "vm_services" {
  type = map(object({
    hosts    = list(string)
    port     = number
    protocol = string
    backends = list(string)
    allow    = list(string)
  }))
  description = "VM-side services mesh workloads call through the mesh-inbound listener (meshgate's vm_services map; needs mesh_inbound). hosts and port are what mesh callers dial (the ServiceEntry's hosts and port, and the SNI outbound_.PORT_._.HOST); backends the VMs as host:port; allow the callers meshgate admits (docs/config.md, vm_services): SPIFFE IDs spiffe://TRUST_DOMAIN/ns/NS/sa/SA (or Istio's TRUST_DOMAIN/ns/NS/sa/SA) or patterns such as ns/NS/*. meshgate checks allow itself: the VMs have no sidecar to enforce AuthorizationPolicies."
  default     = {}

  validation {
    condition = alltrue([for k, s in var.vm_services :
      can(regex("^[a-z0-9_-]+$", k)) && s.port >= 1 && s.port <= 65535 && contains(["http1", "http2", "tcp"], s.protocol) &&
      length(s.hosts) >= 1 && alltrue([for h in s.hosts : can(regex("^[a-z0-9.-]+$", h))]) &&
      length(s.backends) >= 1 && alltrue([for b in s.backends : can(regex("^[A-Za-z0-9.-]+:[0-9]{1,5}$", b))]) &&
      length(s.allow) >= 1 && alltrue([for a in s.allow : can(regex("^[A-Za-z0-9._:/*-]+$", a))])
    ])
    error_message = "vm_services: names of lower-case letters, digits, '-' and '_'; port 1-65535; protocol http1, http2 or tcp; at least one host (lower-case DNS name), one backend (host:port) and one allow entry (no spaces or quotes)."
  }
}

variable "proxy_port" {
  type        = number
  description = "Port of meshgate's VM-facing listener on the instances; every NLB listener forwards here."
  default     = 8080

  validation {
    condition     = var.proxy_port >= 1 && var.proxy_port <= 65535
    error_message = "proxy_port: 1-65535."
  }
}

variable "admin_port" {
  type        = number
  description = "Port of meshgate's admin API (admin.bind): the NLB health check (/readyz), Prometheus (/metrics) and the autoscaler (/drain) use it."
  default     = 9901

  validation {
    condition     = var.admin_port >= 1 && var.admin_port <= 65535
    error_message = "admin_port: 1-65535."
  }
}

variable "admin_token_secret_arn" {
  type        = string
  description = "Optional Secrets Manager secret (plain string) holding the bearer token that POST /reload and POST /drain require (admin.token_file). Give the same ARN to the autoscaler module."
  default     = null

  validation {
    condition     = var.admin_token_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", var.admin_token_secret_arn))
    error_message = "admin_token_secret_arn: a Secrets Manager secret ARN."
  }
}

variable "proxy_protocol_v2" {
  type        = bool
  description = "Enable PROXY protocol v2 on the target group (client IP preservation off) and set the meshgate listener to proxy_protocol: required with trusted_proxies = the subnets' CIDRs. Needed for tenants' vpce matching. The NLB then prefixes its health checks with a PROXY header too; meshgate's admin port reads it from trusted_proxies, so the health check stays GET /readyz on admin_port."
  default     = false
}

variable "drain_delay_seconds" {
  type        = number
  description = "meshgate's drain.delay: after SIGTERM or POST /drain, readiness is off but the listener keeps serving this long. Also the target group's deregistration delay. Must cover the health check (interval x unhealthy threshold)."
  default     = 30

  validation {
    condition     = var.drain_delay_seconds >= 0 && var.drain_delay_seconds <= 3600 && floor(var.drain_delay_seconds) == var.drain_delay_seconds
    error_message = "drain_delay_seconds: whole seconds, 0-3600 (the NLB deregistration delay range)."
  }
}

variable "drain_spread_seconds" {
  type        = number
  description = "meshgate's drain.spread: window over which client connections are asked to close."
  default     = 10

  validation {
    condition     = var.drain_spread_seconds >= 0 && floor(var.drain_spread_seconds) == var.drain_spread_seconds
    error_message = "drain_spread_seconds: whole seconds, 0 or more."
  }
}

variable "drain_timeout_seconds" {
  type        = number
  description = "meshgate's drain.timeout: hard limit for the whole drain (delay + spread must fit). systemd's TimeoutStopSec is set 30 s above it."
  default     = 60

  validation {
    condition     = var.drain_timeout_seconds >= 1 && floor(var.drain_timeout_seconds) == var.drain_timeout_seconds
    error_message = "drain_timeout_seconds: whole seconds, at least 1."
  }
}

variable "health_check_interval_seconds" {
  type        = number
  description = "NLB health check interval."
  default     = 10

  validation {
    condition     = var.health_check_interval_seconds >= 5 && var.health_check_interval_seconds <= 300
    error_message = "health_check_interval_seconds: 5-300."
  }
}

variable "health_check_unhealthy_threshold" {
  type        = number
  description = "Consecutive failed health checks before the NLB stops sending new connections to an instance."
  default     = 2

  validation {
    condition     = var.health_check_unhealthy_threshold >= 2 && var.health_check_unhealthy_threshold <= 10
    error_message = "health_check_unhealthy_threshold: 2-10."
  }
}

variable "health_check_healthy_threshold" {
  type        = number
  description = "Consecutive successful health checks before an instance receives traffic."
  default     = 2

  validation {
    condition     = var.health_check_healthy_threshold >= 2 && var.health_check_healthy_threshold <= 10
    error_message = "health_check_healthy_threshold: 2-10."
  }
}

variable "ami_id" {
  type        = string
  description = "AMI of the instances: Amazon Linux 2023 or another systemd distribution with bash, curl, python3, openssl and the AWS CLI v2, of the same architecture as the meshgate binary."

  validation {
    condition     = can(regex("^ami-[0-9a-f]+$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type (its architecture must match the binary)."
  default     = "c6i.large"
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of the encrypted gp3 root volume."
  default     = 16

  validation {
    condition     = var.root_volume_size_gb >= 8
    error_message = "root_volume_size_gb: at least 8."
  }
}

variable "root_device_name" {
  type        = string
  description = "Root device name of the AMI (/dev/xvda on Amazon Linux 2023)."
  default     = "/dev/xvda"
}

variable "ebs_kms_key_arn" {
  type        = string
  description = "Optional customer managed KMS key for the root volume; null uses the account's default EBS key (the volume is encrypted either way)."
  default     = null
}

variable "min_size" {
  type        = number
  description = "Minimum instances in the Auto Scaling group (also the initial desired capacity; meshgate-autoscaler owns the desired capacity afterwards)."
  default     = 2

  validation {
    condition     = var.min_size >= 1
    error_message = "min_size: at least 1."
  }
}

variable "max_size" {
  type        = number
  description = "Maximum instances in the Auto Scaling group."
  default     = 10

  validation {
    condition     = var.max_size >= 1
    error_message = "max_size: at least 1."
  }
}

variable "health_check_grace_period_seconds" {
  type        = number
  description = "Seconds after launch before the Auto Scaling group acts on the NLB health check."
  default     = 180
}

variable "terminating_hook_heartbeat_timeout_seconds" {
  type        = number
  description = "Heartbeat timeout of the Terminating:Wait lifecycle hook: how long an instance waits for meshgate-autoscaler's drain (it records a heartbeat every heartbeat_interval) before the default result CONTINUE terminates it; on termination systemd still drains meshgate on SIGTERM."
  default     = 600

  validation {
    condition     = var.terminating_hook_heartbeat_timeout_seconds >= 30 && var.terminating_hook_heartbeat_timeout_seconds <= 7200
    error_message = "terminating_hook_heartbeat_timeout_seconds: 30-7200."
  }
}

variable "launching_hook_enabled" {
  type        = bool
  description = "Add a Pending:Wait lifecycle hook: meshgate-autoscaler completes it once the new instance's /readyz is 200. Leave off when the autoscaler is not deployed (instances would wait for the hook's timeout)."
  default     = false
}

variable "launching_hook_heartbeat_timeout_seconds" {
  type        = number
  description = "Heartbeat timeout of the optional Pending:Wait hook (default result CONTINUE)."
  default     = 600

  validation {
    condition     = var.launching_hook_heartbeat_timeout_seconds >= 30 && var.launching_hook_heartbeat_timeout_seconds <= 7200
    error_message = "launching_hook_heartbeat_timeout_seconds: 30-7200."
  }
}

variable "binary_s3_uri" {
  type        = string
  description = "s3://BUCKET/KEY of the meshgate binary (Linux, the instances' architecture). Exactly one of binary_s3_uri and binary_url."
  default     = null

  validation {
    condition     = var.binary_s3_uri == null || can(regex("^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[A-Za-z0-9!_.*()/-]+$", var.binary_s3_uri))
    error_message = "binary_s3_uri: s3://BUCKET/KEY with a plain key (letters, digits, !_.*()/-)."
  }
}

variable "binary_url" {
  type        = string
  description = "https:// URL of the meshgate binary. Exactly one of binary_s3_uri and binary_url."
  default     = null

  validation {
    condition     = var.binary_url == null || can(regex("^https://[A-Za-z0-9.-]+(:[0-9]+)?/[A-Za-z0-9!_.~*()/%+=&?-]*$", var.binary_url))
    error_message = "binary_url: an https:// URL without quotes, spaces or shell metacharacters."
  }
}

variable "binary_sha256" {
  type        = string
  description = "Optional SHA-256 (hex) of the binary; the bootstrap refuses any other file."
  default     = null

  validation {
    condition     = var.binary_sha256 == null || can(regex("^[0-9a-f]{64}$", var.binary_sha256))
    error_message = "binary_sha256: 64 lower-case hex digits."
  }
}

variable "identity_source" {
  type        = string
  description = "Where the workload certificate comes from: secretsmanager (one JSON secret with cert_chain, key, root_cert), ssm (SecureString parameters PREFIX/cert-chain.pem, PREFIX/key.pem, PREFIX/root-cert.pem) or vault-agent (Vault PKI through a Vault agent template)."
  default     = "secretsmanager"

  validation {
    condition     = contains(["secretsmanager", "ssm", "vault-agent"], var.identity_source)
    error_message = "identity_source: secretsmanager, ssm or vault-agent."
  }
}

variable "identity_secret_arn" {
  type        = string
  description = "identity_source = secretsmanager: ARN of the secret holding {\"cert_chain\": PEM, \"key\": PEM, \"root_cert\": PEM}."
  default     = null

  validation {
    condition     = var.identity_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", var.identity_secret_arn))
    error_message = "identity_secret_arn: a Secrets Manager secret ARN."
  }
}

variable "identity_ssm_prefix" {
  type        = string
  description = "identity_source = ssm: parameter path prefix, e.g. /meshgate/identity (parameters cert-chain.pem, key.pem, root-cert.pem below it)."
  default     = null

  validation {
    condition     = var.identity_ssm_prefix == null || can(regex("^(/[A-Za-z0-9_.-]+)+$", var.identity_ssm_prefix))
    error_message = "identity_ssm_prefix: a parameter path such as /meshgate/identity."
  }
}

variable "identity_kms_key_arn" {
  type        = string
  description = "Optional customer managed KMS key that encrypts the identity secret/parameters (and the admin token secret); the instances get kms:Decrypt on it via Secrets Manager/SSM only. Not needed for AWS managed keys."
  default     = null

  validation {
    condition     = var.identity_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f-]+$", var.identity_kms_key_arn))
    error_message = "identity_kms_key_arn: a KMS key ARN."
  }
}

variable "identity_refresh_minutes" {
  type        = number
  description = "secretsmanager/ssm: how often a systemd timer fetches the certificate again (meshgate picks up changed files by itself). Keep it well below the certificate lifetime."
  default     = 15

  validation {
    condition     = var.identity_refresh_minutes >= 1 && floor(var.identity_refresh_minutes) == var.identity_refresh_minutes
    error_message = "identity_refresh_minutes: whole minutes, at least 1."
  }
}

variable "identity_dir" {
  type        = string
  description = "Directory of the workload identity files cert-chain.pem, key.pem and root-cert.pem (meshgate's mesh.identity.*)."
  default     = "/etc/meshgate/certs"

  validation {
    condition     = can(regex("^(/[A-Za-z0-9_.-]+)+$", var.identity_dir))
    error_message = "identity_dir: an absolute path of letters, digits, '_', '.', '-'."
  }
}

variable "vault" {
  type = object({
    address        = string
    auth_mount     = optional(string, "aws")
    auth_role      = string
    pki_issue_path = string
    root_ca_path   = string
    ttl            = optional(string, "24h")
    egress_cidrs   = list(string)
  })
  description = "identity_source = vault-agent: Vault address (https://HOST:PORT), AWS IAM auth mount and role, the PKI issue path (e.g. pki_meshgate/issue/meshgate; the role must allow the URI SAN spiffe_id), the path whose .Data.certificate is the mesh root (e.g. pki_root/cert/ca), the certificate TTL and the CIDRs where Vault listens."
  default     = null

  validation {
    condition     = var.vault == null || (can(regex("^https://[A-Za-z0-9.-]+(:[0-9]+)?$", var.vault.address)) && can(regex("^[A-Za-z0-9_./-]+$", var.vault.pki_issue_path)) && can(regex("^[A-Za-z0-9_./-]+$", var.vault.root_ca_path)) && can(regex("^[A-Za-z0-9_.-]+$", var.vault.auth_role)) && can(regex("^[A-Za-z0-9_.-]+$", var.vault.auth_mount)) && can(regex("^[0-9]+[smh]$", var.vault.ttl)))
    error_message = "vault: address https://HOST[:PORT]; paths, role and mount of letters, digits, _ . / -; ttl like 24h."
  }
}

variable "nofile_limit" {
  type        = number
  description = "systemd LimitNOFILE of meshgate: each client connection and each pooled upstream connection is a descriptor (limits.max_connections defaults to 20000)."
  default     = 65536

  validation {
    condition     = var.nofile_limit >= 4096
    error_message = "nofile_limit: at least 4096."
  }
}

variable "log_level" {
  type        = string
  description = "meshgate's log.level (a tracing filter such as info or meshgate=debug,access=info)."
  default     = "info"

  validation {
    condition     = can(regex("^[A-Za-z0-9_:=,.-]+$", var.log_level))
    error_message = "log_level: a tracing filter such as info."
  }
}

variable "deletion_protection" {
  type        = bool
  description = "NLB deletion protection (turn off before destroying the fleet)."
  default     = true
}

variable "ssm_session_manager" {
  type        = bool
  description = "Attach AmazonSSMManagedInstanceCore so operators can open Session Manager shells (no SSH port is ever opened)."
  default     = false
}

variable "tags" {
  type        = map(string)
  description = "Tags for every resource (propagated to the instances)."
  default     = {}
}
