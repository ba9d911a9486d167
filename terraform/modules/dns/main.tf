# Private DNS for the mesh names: VMs resolve reviews.bookinfo.svc.cluster.local (or a wildcard)
# to the internal NLB in front of the meshgate fleet, and keep calling the name they know.

locals {
  # The one zone each record belongs to (validated below).
  record_zone = {
    for r in var.record_names : r => [for z in var.zone_names : z if r == z || endswith(r, ".${z}")]
  }
}

resource "aws_route53_zone" "mesh" {
  #checkov:skip=CKV2_AWS_38:DNSSEC signing applies to public hosted zones only; these are private zones.
  #checkov:skip=CKV2_AWS_39:Query logging of private zones is Route 53 Resolver query logging, configured per VPC, not per hosted zone.
  for_each = toset(var.zone_names)

  name          = each.value
  comment       = "meshgate: mesh service names resolving to the meshgate NLB"
  force_destroy = false

  dynamic "vpc" {
    for_each = var.vpc_ids
    content {
      vpc_id = vpc.value
    }
  }

  tags = var.tags

  lifecycle {
    precondition {
      condition     = length([for z in var.zone_names : z if z != each.value && endswith(each.value, ".${z}")]) == 0
      error_message = "Zone ${each.value} is inside another of zone_names; nested private zones shadow each other."
    }
  }
}

resource "aws_route53_record" "service" {
  for_each = toset(var.record_names)

  zone_id = aws_route53_zone.mesh[try(local.record_zone[each.value][0], var.zone_names[0])].zone_id
  name    = each.value
  type    = "A"

  alias {
    name                   = var.nlb_dns_name
    zone_id                = var.nlb_zone_id
    evaluate_target_health = true
  }

  lifecycle {
    precondition {
      condition     = length(local.record_zone[each.value]) == 1
      error_message = "Record ${each.value} must fall in exactly one of zone_names."
    }
  }
}
