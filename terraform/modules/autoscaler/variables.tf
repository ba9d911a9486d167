# Inputs of meshgate-autoscaler's deployment. The keys it renders into autoscaler.yaml follow
# infra/autoscaler/README.md ("Config reference"); templates/autoscaler.yaml.tftpl writes them.

variable "name" {
  type        = string
  description = "Name of the autoscaler's Auto Scaling group (of one instance) and prefix of its resources."
  default     = "meshgate-autoscaler"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,31}$", var.name))
    error_message = "name: lower-case letters, digits and '-', at most 32 characters."
  }
}

variable "vpc_id" {
  type        = string
  description = "The VPC the autoscaler runs in (the fleet's)."

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets for the autoscaler instance (it needs to reach Prometheus, the fleet's admin port and the Auto Scaling/EC2 APIs)."

  validation {
    condition     = length(var.subnet_ids) >= 1 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids: at least one subnet id (subnet-…)."
  }
}

variable "ami_id" {
  type        = string
  description = "AMI of the instance: Amazon Linux 2023 or another systemd distribution with curl and the AWS CLI v2, of the binary's architecture."

  validation {
    condition     = can(regex("^ami-[0-9a-f]+$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type; the controller is small (one PromQL query and a few AWS calls per interval)."
  default     = "t3.micro"
}

variable "binary_s3_uri" {
  type        = string
  description = "s3://BUCKET/KEY of the meshgate-autoscaler binary. Exactly one of binary_s3_uri and binary_url."
  default     = null

  validation {
    condition     = var.binary_s3_uri == null || can(regex("^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[A-Za-z0-9!_.*()/-]+$", var.binary_s3_uri))
    error_message = "binary_s3_uri: s3://BUCKET/KEY with a plain key (letters, digits, !_.*()/-)."
  }
}

variable "binary_url" {
  type        = string
  description = "https:// URL of the meshgate-autoscaler binary. Exactly one of binary_s3_uri and binary_url."
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

variable "prometheus_url" {
  type        = string
  description = "Base URL of the Prometheus HTTP API that scrapes the fleet (prometheus.url), e.g. http://prometheus.internal:9090."

  validation {
    condition     = can(regex("^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~/-]*)?$", var.prometheus_url))
    error_message = "prometheus_url: http:// or https:// URL."
  }
}

variable "prometheus_cidrs" {
  type        = list(string)
  description = "CIDRs where Prometheus listens: the autoscaler may connect there on the URL's port."

  validation {
    condition     = length(var.prometheus_cidrs) >= 1 && alltrue([for c in var.prometheus_cidrs : can(cidrhost(c, 0))])
    error_message = "prometheus_cidrs: at least one CIDR."
  }
}

variable "https_egress_cidrs" {
  type        = list(string)
  description = "CIDRs the autoscaler may reach on 443: the Auto Scaling and EC2 APIs (or their VPC endpoints), S3/Secrets Manager at boot, the binary URL."
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for c in var.https_egress_cidrs : can(cidrhost(c, 0))])
    error_message = "https_egress_cidrs: CIDRs."
  }
}

variable "group_name" {
  type        = string
  description = "The fleet's Auto Scaling group name (fleet output autoscaling_group_name)."

  validation {
    condition     = length(var.group_name) >= 1 && length(var.group_name) <= 255 && !strcontains(var.group_name, "\"")
    error_message = "group_name: 1-255 characters, no quotes."
  }
}

variable "group_arn" {
  type        = string
  description = "The fleet's Auto Scaling group ARN (fleet output autoscaling_group_arn): SetDesiredCapacity and the lifecycle calls are allowed on it only."
}

variable "admin_port" {
  type        = number
  description = "meshgate's admin port on the fleet instances (fleet output admin_port): POST /drain and /metrics during scale-in, /readyz for Pending:Wait."
  default     = 9901

  validation {
    condition     = var.admin_port >= 1 && var.admin_port <= 65535
    error_message = "admin_port: 1-65535."
  }
}

variable "admin_client_security_group_id" {
  type        = string
  description = "The fleet's admin client security group (fleet output admin_client_security_group_id), attached to the autoscaler so it may reach the admin port."

  validation {
    condition     = can(regex("^sg-[0-9a-f]+$", var.admin_client_security_group_id))
    error_message = "admin_client_security_group_id: sg-…"
  }
}

variable "admin_token_secret_arn" {
  type        = string
  description = "Optional Secrets Manager secret with meshgate's admin token (the fleet's admin_token_secret_arn), sent with POST /drain."
  default     = null

  validation {
    condition     = var.admin_token_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", var.admin_token_secret_arn))
    error_message = "admin_token_secret_arn: a Secrets Manager secret ARN."
  }
}

variable "target" {
  type        = number
  description = "Value of the primary signal per instance the fleet is sized for (default signal: requests in flight per ready meshgate)."

  validation {
    condition     = var.target > 0
    error_message = "target must be positive."
  }
}

variable "query" {
  type        = string
  description = "PromQL of the primary signal, per instance; null uses the autoscaler's default (in-flight requests per ready meshgate, job=\"meshgate\")."
  default     = null
}

variable "extra_signals" {
  type = list(object({
    name   = string
    query  = string
    target = number
  }))
  description = "More signals ({name, query, target}); the largest recommendation wins."
  default     = []

  validation {
    condition     = alltrue([for s in var.extra_signals : can(regex("^[a-z0-9_-]{1,64}$", s.name)) && s.target > 0])
    error_message = "extra_signals: names of lower-case letters, digits, '-' and '_'; positive targets."
  }
}

variable "min_capacity" {
  type        = number
  description = "Lowest desired capacity the autoscaler sets."

  validation {
    condition     = var.min_capacity >= 0 && floor(var.min_capacity) == var.min_capacity
    error_message = "min_capacity: a whole number, 0 or more."
  }
}

variable "max_capacity" {
  type        = number
  description = "Highest desired capacity the autoscaler sets (the group's MaxSize also applies)."

  validation {
    condition     = var.max_capacity >= 1 && floor(var.max_capacity) == var.max_capacity
    error_message = "max_capacity: a whole number, at least 1."
  }
}

variable "interval" {
  type        = string
  description = "Evaluation interval (duration such as 15s)."
  default     = "15s"

  validation {
    condition     = can(regex("^[0-9]+(ms|s|m|h)$", var.interval))
    error_message = "interval: a duration such as 15s."
  }
}

variable "scale_down_stabilization" {
  type        = string
  description = "Scale-in stabilization window (duration)."
  default     = "5m"

  validation {
    condition     = can(regex("^[0-9]+(ms|s|m|h)$", var.scale_down_stabilization))
    error_message = "scale_down_stabilization: a duration such as 5m."
  }
}

variable "warm_up" {
  type        = string
  description = "Warm-up of a new instance (duration)."
  default     = "2m"

  validation {
    condition     = can(regex("^[0-9]+(ms|s|m|h)$", var.warm_up))
    error_message = "warm_up: a duration such as 2m."
  }
}

variable "drain_timeout_seconds" {
  type        = number
  description = "How long the autoscaler waits for a terminating instance to drain before completing its lifecycle action anyway; must exceed meshgate's drain.timeout."
  default     = 300

  validation {
    condition     = var.drain_timeout_seconds >= 1 && floor(var.drain_timeout_seconds) == var.drain_timeout_seconds
    error_message = "drain_timeout_seconds: whole seconds, at least 1."
  }
}

variable "heartbeat_interval_seconds" {
  type        = number
  description = "RecordLifecycleActionHeartbeat interval while an instance drains; must stay below the hook's heartbeat timeout."
  default     = 60

  validation {
    condition     = var.heartbeat_interval_seconds >= 1 && floor(var.heartbeat_interval_seconds) == var.heartbeat_interval_seconds
    error_message = "heartbeat_interval_seconds: whole seconds, at least 1."
  }
}

variable "fleet_drain_timeout_seconds" {
  type        = number
  description = "meshgate's drain.timeout on the fleet (fleet output drain_timeout_seconds), checked against drain_timeout_seconds."
}

variable "lifecycle_hook_heartbeat_timeout_seconds" {
  type        = number
  description = "Heartbeat timeout of the fleet's Terminating:Wait hook (fleet output terminating_hook_heartbeat_timeout_seconds), checked against heartbeat_interval_seconds."
}

variable "metrics_port" {
  type        = number
  description = "Port of the autoscaler's own /metrics and /healthz (bind)."
  default     = 9902

  validation {
    condition     = var.metrics_port >= 1 && var.metrics_port <= 65535
    error_message = "metrics_port: 1-65535."
  }
}

variable "monitoring_security_group_ids" {
  type        = list(string)
  description = "Security groups (Prometheus) allowed to scrape the autoscaler's metrics port."
  default     = []

  validation {
    condition     = alltrue([for s in var.monitoring_security_group_ids : can(regex("^sg-[0-9a-f]+$", s))])
    error_message = "monitoring_security_group_ids: security group ids (sg-…)."
  }
}

variable "dry_run" {
  type        = bool
  description = "Print decisions only: no SetDesiredCapacity, no drain, no lifecycle completion (a first deployment can watch before it acts)."
  default     = false
}

variable "tags" {
  type        = map(string)
  description = "Tags for every resource (propagated to the instance)."
  default     = {}
}
