# Who may talk to whom:
#   VM CIDRs --(service ports)--> NLB --(proxy port, health check)--> instances
#   mesh CIDRs --(mesh-inbound port)--> NLB --> instances            (optional, mesh_inbound)
#   monitoring / autoscaler SGs --(admin port)--> instances
#   instances --> east-west gateway (gateway port), AWS APIs (443), Vault (optional),
#                 VM backends (their ports, optional)
# Nothing else: no SSH (use Session Manager, see ssm_session_manager).

resource "aws_security_group" "nlb" {
  name_prefix = "${var.name}-nlb-"
  description = "meshgate ${var.name} NLB: service ports from the VM CIDRs only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-nlb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "nlb_from_vms" {
  for_each = { for pair in setproduct(var.vm_cidrs, local.listener_ports) : "${pair[0]}:${pair[1]}" => { cidr = pair[0], port = tonumber(pair[1]) } }

  security_group_id = aws_security_group.nlb.id
  description       = "VMs to service port ${each.value.port}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_proxy" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "NLB to meshgate proxy listener"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = var.proxy_port
  to_port                      = var.proxy_port
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nlb_health_check" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "NLB health check to meshgate /readyz"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "nlb_from_mesh" {
  for_each = toset(local.inbound_source_cidrs)

  security_group_id = aws_security_group.nlb.id
  description       = "Mesh sidecars and gateways to the mesh-inbound port"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = local.inbound_port
  to_port           = local.inbound_port
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_mesh_inbound" {
  count = var.mesh_inbound == null ? 0 : 1

  security_group_id            = aws_security_group.nlb.id
  description                  = "NLB to meshgate mesh-inbound listener"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = local.inbound_port
  to_port                      = local.inbound_port
  tags                         = local.tags
}

resource "aws_security_group" "instance" {
  name_prefix = "${var.name}-instance-"
  description = "meshgate ${var.name} instances: proxy port from the NLB and VM CIDRs, admin port from monitoring and the autoscaler"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-instance" })

  lifecycle {
    create_before_destroy = true
  }
}

# Through the NLB: with PROXY protocol (client IP preservation off) the source is an NLB node.
resource "aws_vpc_security_group_ingress_rule" "proxy_from_nlb" {
  security_group_id            = aws_security_group.instance.id
  description                  = "NLB to meshgate proxy listener"
  referenced_security_group_id = aws_security_group.nlb.id
  ip_protocol                  = "tcp"
  from_port                    = var.proxy_port
  to_port                      = var.proxy_port
  tags                         = local.tags
}

# Without PROXY protocol the NLB preserves client IPs, so the instances see the VMs' addresses.
resource "aws_vpc_security_group_ingress_rule" "proxy_from_vms" {
  for_each = var.proxy_protocol_v2 ? toset([]) : toset(var.vm_cidrs)

  security_group_id = aws_security_group.instance.id
  description       = "VMs (client IP preserved by the NLB) to meshgate proxy listener"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = var.proxy_port
  to_port           = var.proxy_port
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "mesh_inbound_from_nlb" {
  count = var.mesh_inbound == null ? 0 : 1

  security_group_id            = aws_security_group.instance.id
  description                  = "NLB to meshgate mesh-inbound listener"
  referenced_security_group_id = aws_security_group.nlb.id
  ip_protocol                  = "tcp"
  from_port                    = local.inbound_port
  to_port                      = local.inbound_port
  tags                         = local.tags
}

# The mesh-inbound target group always preserves client IPs: the instances see the callers'
# pod or gateway addresses.
resource "aws_vpc_security_group_ingress_rule" "mesh_inbound_from_mesh" {
  for_each = toset(local.inbound_source_cidrs)

  security_group_id = aws_security_group.instance.id
  description       = "Mesh sidecars and gateways (client IP preserved by the NLB) to meshgate mesh-inbound listener"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = local.inbound_port
  to_port           = local.inbound_port
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "admin_from_nlb" {
  security_group_id            = aws_security_group.instance.id
  description                  = "NLB health check to meshgate /readyz"
  referenced_security_group_id = aws_security_group.nlb.id
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "admin_from_admin_client" {
  security_group_id            = aws_security_group.instance.id
  description                  = "Members of the admin client group (autoscaler, Prometheus) to meshgate admin API"
  referenced_security_group_id = aws_security_group.admin_client.id
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "admin_from_monitoring" {
  # Keyed by position so that ids only known after apply still give plan-time keys.
  for_each = { for i, sg in var.admin_source_security_group_ids : tostring(i) => sg }

  security_group_id            = aws_security_group.instance.id
  description                  = "Monitoring to meshgate admin API"
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "to_gateway" {
  for_each = { for pair in setproduct(var.mesh_gateway_cidrs, local.gateway_ports) : "${pair[0]}:${pair[1]}" => { cidr = pair[0], port = tonumber(pair[1]) } }

  security_group_id = aws_security_group.instance.id
  description       = "meshgate to the Istio east-west gateway (AUTO_PASSTHROUGH)"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "to_vm_backends" {
  for_each = { for pair in setproduct(local.inbound_backend_cidrs, local.vm_backend_ports) : "${pair[0]}:${pair[1]}" => { cidr = pair[0], port = tonumber(pair[1]) } }

  security_group_id = aws_security_group.instance.id
  description       = "meshgate to the VM backends of vm_services (mesh-inbound)"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.https_egress_cidrs)

  security_group_id = aws_security_group.instance.id
  description       = "AWS APIs (S3, Secrets Manager, SSM, KMS) and the binary URL"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "vault" {
  for_each = var.vault == null ? toset([]) : toset(var.vault.egress_cidrs)

  security_group_id = aws_security_group.instance.id
  description       = "Vault agent to Vault"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = local.vault_port
  to_port           = local.vault_port
  tags              = local.tags
}

# Attach this group to Prometheus and to meshgate-autoscaler: it lets them reach the admin port.
resource "aws_security_group" "admin_client" {
  #checkov:skip=CKV2_AWS_5:Attached outside this module on purpose: the autoscaler module and the Prometheus hosts take it (output admin_client_security_group_id).
  name_prefix = "${var.name}-admin-client-"
  description = "Members may reach the meshgate ${var.name} admin API (metrics, readyz, drain)"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-admin-client" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "admin_client_to_admin" {
  security_group_id            = aws_security_group.admin_client.id
  description                  = "To meshgate admin API"
  referenced_security_group_id = aws_security_group.instance.id
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  tags                         = local.tags
}
