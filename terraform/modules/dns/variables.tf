variable "zone_names" {
  type        = list(string)
  description = "Mesh domains to serve as Route 53 private hosted zones, e.g. [\"svc.cluster.local\"] or a custom suffix. No zone may be inside another (each record must fall in exactly one zone)."

  validation {
    condition     = length(var.zone_names) >= 1 && alltrue([for z in var.zone_names : can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?$", z))])
    error_message = "zone_names: one or more lower-case domain names without a trailing dot."
  }
}

variable "vpc_ids" {
  type        = list(string)
  description = "The VM VPCs (same account and region) the private zones are associated with: their resolvers answer the mesh names. The first one is the zone's primary VPC."

  validation {
    condition     = length(var.vpc_ids) >= 1 && alltrue([for v in var.vpc_ids : can(regex("^vpc-[0-9a-f]+$", v))])
    error_message = "vpc_ids: one or more VPC ids (vpc-…)."
  }
}

variable "record_names" {
  type        = list(string)
  description = "Names to point at the NLB (alias A records): the services' hosts and aliases, or wildcards such as *.bookinfo.svc.cluster.local. Each must fall in exactly one of zone_names."

  validation {
    condition     = alltrue([for r in var.record_names : can(regex("^(\\*\\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?$", r))])
    error_message = "record_names: lower-case DNS names, optionally starting with *."
  }
}

variable "nlb_dns_name" {
  type        = string
  description = "DNS name of the fleet's NLB (fleet module output nlb_dns_name)."
}

variable "nlb_zone_id" {
  type        = string
  description = "Hosted zone id of the fleet's NLB (fleet module output nlb_zone_id)."
}

variable "tags" {
  type        = map(string)
  description = "Tags for the hosted zones."
  default     = {}
}
