variable "region" {
  type        = string
  description = "AWS region of the VPC."
}

variable "name" {
  type        = string
  description = "Name of the fleet (Auto Scaling group, NLB, resource prefix)."
  default     = "meshgate"
}

variable "vpc_id" {
  type        = string
  description = "Existing VPC for the fleet."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Existing private subnets of that VPC, one per availability zone, for the NLB, the fleet and the autoscaler."
}

variable "vm_vpc_ids" {
  type        = list(string)
  description = "VPCs of the calling VMs (same account and region; include vpc_id if VMs live there): the private DNS zones are associated with them."
}

variable "vm_cidrs" {
  type        = list(string)
  description = "CIDRs of the calling VMs."
}

variable "mesh_zone_names" {
  type        = list(string)
  description = "Mesh domains that get private hosted zones, e.g. [\"svc.cluster.local\"]."
  default     = ["svc.cluster.local"]
}

variable "dns_record_names" {
  type        = list(string)
  description = "Names to point at the NLB; null means every service host and alias."
  default     = null
}

variable "mesh_gateways" {
  type        = list(string)
  description = "East-west gateway address(es), host:port (port 15443)."
}

variable "mesh_gateway_cidrs" {
  type        = list(string)
  description = "CIDRs of the east-west gateway's load balancer."
}

variable "trust_domain" {
  type        = string
  description = "Mesh trust domain."
  default     = "cluster.local"
}

variable "spiffe_id" {
  type        = string
  description = "meshgate's SPIFFE ID (spiffe://TRUST_DOMAIN/ns/NS/sa/SA)."
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
  description = "Mesh services to expose (see the fleet module)."
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
  description = "Callers and what they may reach (see the fleet module)."
}

variable "mesh_inbound" {
  type = object({
    port          = optional(number, 15443)
    source_cidrs  = list(string)
    backend_cidrs = list(string)
  })
  description = "The mesh → VM direction (see the fleet module and infra/istio/inbound); null leaves it off."
  default     = null
}

variable "vm_services" {
  type = map(object({
    hosts    = list(string)
    port     = number
    protocol = string
    backends = list(string)
    allow    = list(string)
  }))
  description = "VM services mesh workloads may call through meshgate (see the fleet module)."
  default     = {}
}

variable "proxy_protocol_v2" {
  type        = bool
  description = "PROXY protocol v2 between NLB and meshgate (see the fleet module's README)."
  default     = false
}

variable "ami_id" {
  type        = string
  description = "AMI for the fleet and the autoscaler (Amazon Linux 2023, the binaries' architecture)."
}

variable "instance_type" {
  type        = string
  description = "Instance type of the fleet."
  default     = "c6i.large"
}

variable "meshgate_binary_s3_uri" {
  type        = string
  description = "s3://BUCKET/KEY of the meshgate binary."
}

variable "meshgate_binary_sha256" {
  type        = string
  description = "SHA-256 of the meshgate binary."
  default     = null
}

variable "autoscaler_binary_s3_uri" {
  type        = string
  description = "s3://BUCKET/KEY of the meshgate-autoscaler binary."
}

variable "autoscaler_binary_sha256" {
  type        = string
  description = "SHA-256 of the meshgate-autoscaler binary."
  default     = null
}

variable "identity_secret_arn" {
  type        = string
  description = "Secrets Manager secret with meshgate's workload identity as {cert_chain, key, root_cert} (see infra/istio/identity)."
}

variable "admin_token_secret_arn" {
  type        = string
  description = "Optional Secrets Manager secret with the admin API token."
  default     = null
}

variable "monitoring_security_group_ids" {
  type        = list(string)
  description = "Security groups of the Prometheus hosts (they scrape the fleet and the autoscaler)."
  default     = []
}

variable "prometheus_url" {
  type        = string
  description = "Prometheus HTTP API the autoscaler queries."
}

variable "prometheus_cidrs" {
  type        = list(string)
  description = "CIDRs of the Prometheus hosts."
}

variable "min_size" {
  type        = number
  description = "Fewest meshgate instances."
  default     = 2
}

variable "max_size" {
  type        = number
  description = "Most meshgate instances."
  default     = 10
}

variable "autoscaler_target" {
  type        = number
  description = "Requests in flight per instance the fleet is sized for."
  default     = 25
}

variable "tags" {
  type        = map(string)
  description = "Tags for every resource."
  default     = {}
}
