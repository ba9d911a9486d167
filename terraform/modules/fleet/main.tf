# The meshgate fleet: internal NLB -> Auto Scaling group of meshgate instances -> Istio
# east-west gateway. The instance bootstrap (binary, config, identity, systemd) is rendered from
# templates/; terraform/tests renders the same templates and runs `meshgate check` on the result.

data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

# The NLB's nodes take their addresses from these subnets: with PROXY protocol they are the peers
# whose headers meshgate believes (trusted_proxies), on the proxy listener and on the admin port
# (health checks).
data "aws_subnet" "this" {
  for_each = toset(var.subnet_ids)
  id       = each.value
}

locals {
  tags = merge(var.tags, { "meshgate:fleet" = var.name })

  subnet_cidrs = sort([for s in data.aws_subnet.this : s.cidr_block])

  # One NLB listener per distinct service port, all forwarding to meshgate's proxy listener:
  # VMs keep the service's own port in the URL (reviews.bookinfo.svc.cluster.local:9080), and
  # meshgate routes on Host with that port.
  listener_ports = toset([for s in values(var.services) : tostring(s.port)])

  # Every name VMs use for a service: DNS records for the dns module.
  service_names = sort(distinct(flatten([for s in values(var.services) : concat([s.host], s.aliases)])))

  gateway_ports = toset([for g in var.mesh_gateways : element(split(":", g), 1)])

  # The mesh → VM direction (mesh_inbound, vm_services): empty lists when it is off, so the
  # resources below have nothing to iterate over.
  inbound_port          = var.mesh_inbound == null ? null : var.mesh_inbound.port
  inbound_source_cidrs  = var.mesh_inbound == null ? [] : var.mesh_inbound.source_cidrs
  inbound_backend_cidrs = var.mesh_inbound == null ? [] : var.mesh_inbound.backend_cidrs
  vm_backend_ports      = toset([for b in flatten([for s in values(var.vm_services) : s.backends]) : element(split(":", b), 1)])

  # systemd must give meshgate's drain (cut at drain.timeout) time to finish before SIGKILL.
  stop_timeout_seconds = var.drain_timeout_seconds + 30

  admin_token_file = var.admin_token_secret_arn == null ? null : "/etc/meshgate/admin-token"

  meshgate_config = templatefile("${path.module}/templates/meshgate.yaml.tftpl", {
    proxy_port       = var.proxy_port
    proxy_protocol   = var.proxy_protocol_v2 ? "required" : "off"
    inbound_port     = local.inbound_port
    vm_services      = var.vm_services
    trusted_proxies  = local.subnet_cidrs
    admin_port       = var.admin_port
    admin_token_file = local.admin_token_file
    trust_domain     = var.trust_domain
    gateways         = var.mesh_gateways
    identity_dir     = var.identity_dir
    services         = var.services
    tenants          = var.tenants
    drain_delay      = var.drain_delay_seconds
    drain_spread     = var.drain_spread_seconds
    drain_timeout    = var.drain_timeout_seconds
    log_level        = var.log_level
  })

  systemd_unit = templatefile("${path.module}/templates/meshgate.service.tftpl", {
    nofile_limit         = var.nofile_limit
    stop_timeout_seconds = local.stop_timeout_seconds
    identity_source      = var.identity_source
  })

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    region                 = data.aws_region.current.name
    meshgate_config        = local.meshgate_config
    systemd_unit           = local.systemd_unit
    binary_s3_uri          = var.binary_s3_uri
    binary_url             = var.binary_url
    binary_sha256          = var.binary_sha256
    identity_source        = var.identity_source
    identity_secret_arn    = var.identity_secret_arn
    identity_ssm_prefix    = var.identity_ssm_prefix
    identity_dir           = var.identity_dir
    identity_refresh       = var.identity_refresh_minutes
    spiffe_id              = var.spiffe_id
    admin_token_secret_arn = var.admin_token_secret_arn
    admin_token_file       = local.admin_token_file
    vault                  = var.vault
  })

  binary_s3_bucket = var.binary_s3_uri == null ? null : split("/", trimprefix(var.binary_s3_uri, "s3://"))[0]
  binary_s3_key    = var.binary_s3_uri == null ? null : join("/", slice(split("/", trimprefix(var.binary_s3_uri, "s3://")), 1, length(split("/", trimprefix(var.binary_s3_uri, "s3://")))))

  vault_port = var.vault == null ? null : coalesce(try(tonumber(regex(":([0-9]+)$", var.vault.address)[0]), null), 443)
}

# ---------------------------------------------------------------------------------------------
# Network Load Balancer

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_91:NLB access logs are written only for TLS listeners; these listeners are TCP (mTLS is originated behind the NLB by meshgate), so there is nothing to log. meshgate's access log records every request.
  #checkov:skip=CKV2_AWS_28:WAF protects HTTP(S) load balancers; this is an internal layer-4 NLB, which WAF cannot be associated with.
  name                             = var.name
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = local.tags
}

resource "aws_lb_target_group" "proxy" {
  name                 = "${var.name}-proxy"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  protocol             = "TCP"
  port                 = var.proxy_port
  proxy_protocol_v2    = var.proxy_protocol_v2
  preserve_client_ip   = var.proxy_protocol_v2 ? "false" : "true"
  deregistration_delay = var.drain_delay_seconds
  # Let meshgate's drain close connections (GOAWAY / Connection: close) instead of the NLB
  # resetting them when the deregistration delay ends or the instance turns unhealthy.
  connection_termination = false

  target_health_state {
    enable_unhealthy_connection_termination = false
  }

  # GET /readyz on the admin port, with or without PROXY protocol: with it the NLB prefixes its
  # health checks with a PROXY v2 header too, which meshgate's admin port reads and drops when it
  # comes from a listener's trusted_proxies (the subnets' CIDRs, where the NLB's nodes are).
  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = var.admin_port
    path                = "/readyz"
    matcher             = "200"
    interval            = var.health_check_interval_seconds
    healthy_threshold   = var.health_check_healthy_threshold
    unhealthy_threshold = var.health_check_unhealthy_threshold
    timeout             = 5
  }

  tags = local.tags
}

resource "aws_lb_listener" "service" {
  #checkov:skip=CKV_AWS_2:Plain TCP on purpose: VMs speak plain HTTP to meshgate inside the VPC and meshgate originates the mTLS into the mesh; TLS on this hop would need a certificate for every mesh service name.
  #checkov:skip=CKV_AWS_103:Same listener: TCP, no TLS policy applies.
  for_each          = local.listener_ports
  load_balancer_arn = aws_lb.this.arn
  port              = tonumber(each.value)
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.proxy.arn
  }

  tags = local.tags
}

# The mesh → VM direction: sidecars (directly, or treating the NLB as their network gateway)
# open Istio mTLS to meshgate's mesh-inbound listener, which terminates it with the fleet's
# workload certificate. Client IPs are preserved and no PROXY header is sent, whatever
# proxy_protocol_v2 says: meshgate tells mesh callers apart by their certificates, so a PROXY
# header would add nothing but a second framing for the mTLS listener to expect.
resource "aws_lb_target_group" "mesh_inbound" {
  count = var.mesh_inbound == null ? 0 : 1

  name                   = "${var.name}-mesh"
  vpc_id                 = var.vpc_id
  target_type            = "instance"
  protocol               = "TCP"
  port                   = local.inbound_port
  proxy_protocol_v2      = false
  preserve_client_ip     = "true"
  deregistration_delay   = var.drain_delay_seconds
  connection_termination = false

  target_health_state {
    enable_unhealthy_connection_termination = false
  }

  # The same readiness as the proxy target group: one meshgate process serves both listeners.
  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = var.admin_port
    path                = "/readyz"
    matcher             = "200"
    interval            = var.health_check_interval_seconds
    healthy_threshold   = var.health_check_healthy_threshold
    unhealthy_threshold = var.health_check_unhealthy_threshold
    timeout             = 5
  }

  tags = local.tags
}

resource "aws_lb_listener" "mesh_inbound" {
  #checkov:skip=CKV_AWS_2:TCP on purpose: the mesh's sidecars run Istio mTLS end to end to meshgate, which verifies their client certificates; an NLB TLS listener would terminate that handshake and hide the callers' identities.
  #checkov:skip=CKV_AWS_103:Same listener: TCP carrying mTLS that meshgate terminates, no NLB TLS policy applies.
  count = var.mesh_inbound == null ? 0 : 1

  load_balancer_arn = aws_lb.this.arn
  port              = local.inbound_port
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.mesh_inbound[0].arn
  }

  tags = local.tags
}

# ---------------------------------------------------------------------------------------------
# Launch template and Auto Scaling group

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-"
  description            = "meshgate fleet ${var.name}"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.this.arn
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.instance.id]
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      volume_size           = var.root_volume_size_gb
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags

  lifecycle {
    precondition {
      condition     = (var.binary_s3_uri == null) != (var.binary_url == null)
      error_message = "Set exactly one of binary_s3_uri and binary_url."
    }
    precondition {
      condition     = var.identity_source != "secretsmanager" || var.identity_secret_arn != null
      error_message = "identity_source = secretsmanager needs identity_secret_arn."
    }
    precondition {
      condition     = var.identity_source != "ssm" || var.identity_ssm_prefix != null
      error_message = "identity_source = ssm needs identity_ssm_prefix."
    }
    precondition {
      condition     = var.identity_source != "vault-agent" || var.vault != null
      error_message = "identity_source = vault-agent needs vault."
    }
    precondition {
      condition     = var.drain_delay_seconds + var.drain_spread_seconds <= var.drain_timeout_seconds
      error_message = "meshgate requires drain delay + spread <= drain timeout."
    }
    precondition {
      condition     = var.drain_delay_seconds >= var.health_check_interval_seconds * var.health_check_unhealthy_threshold
      error_message = "drain_delay_seconds must cover the health check (interval x unhealthy threshold): the NLB keeps sending new connections until it sees the instance unready."
    }
    precondition {
      condition     = startswith(var.spiffe_id, "spiffe://${var.trust_domain}/")
      error_message = "spiffe_id must be in trust_domain."
    }
    precondition {
      condition     = var.proxy_port != var.admin_port
      error_message = "proxy_port and admin_port must differ (meshgate refuses an admin.bind equal to a listener)."
    }
    precondition {
      condition     = var.min_size <= var.max_size
      error_message = "min_size must not exceed max_size."
    }
    precondition {
      condition     = local.inbound_port == null ? true : !contains([var.proxy_port, var.admin_port], local.inbound_port)
      error_message = "mesh_inbound.port must differ from proxy_port and admin_port (each is a listener of its own on the instances)."
    }
    precondition {
      condition     = local.inbound_port == null ? true : !contains(local.listener_ports, tostring(local.inbound_port))
      error_message = "mesh_inbound.port must not be a service port: the NLB has one listener per port, and service ports forward to the proxy listener."
    }
    precondition {
      condition     = length(var.vm_services) == 0 || var.mesh_inbound != null
      error_message = "vm_services need mesh_inbound: mesh workloads reach them only through the mesh-inbound listener."
    }
    precondition {
      condition     = var.mesh_inbound == null || length(var.vm_services) > 0
      error_message = "mesh_inbound without vm_services would open a port that serves nothing."
    }
    precondition {
      condition     = alltrue([for a in flatten([for s in values(var.vm_services) : s.allow]) : !can(regex("^(spiffe://[^/]+/|[a-z0-9.-]+/ns/[a-z0-9-]+/sa/)", a)) || startswith(trimprefix(a, "spiffe://"), "${var.trust_domain}/")])
      error_message = "vm_services allow: SPIFFE IDs and principals must be in trust_domain (the module sets no trust_domain_aliases, so meshgate would accept no caller from another)."
    }
  }
}

resource "aws_autoscaling_group" "this" {
  name                      = var.name
  vpc_zone_identifier       = var.subnet_ids
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.min_size
  health_check_type         = "ELB"
  health_check_grace_period = var.health_check_grace_period_seconds
  target_group_arns         = concat([aws_lb_target_group.proxy.arn], aws_lb_target_group.mesh_inbound[*].arn)

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  # Exists before the first instance launches, so a launch is never missed.
  dynamic "initial_lifecycle_hook" {
    for_each = var.launching_hook_enabled ? ["launching"] : []
    content {
      name                 = "${var.name}-ready"
      lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
      heartbeat_timeout    = var.launching_hook_heartbeat_timeout_seconds
      default_result       = "CONTINUE"
    }
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 90
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name, "meshgate:role" = "proxy" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    # meshgate-autoscaler sets the desired capacity from Prometheus.
    ignore_changes = [desired_capacity]
  }
}

# Scale-in without loss: the instance waits in Terminating:Wait while meshgate-autoscaler drains
# it (POST /drain, heartbeats, then CompleteLifecycleAction CONTINUE).
resource "aws_autoscaling_lifecycle_hook" "terminating" {
  name                   = "${var.name}-drain"
  autoscaling_group_name = aws_autoscaling_group.this.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_TERMINATING"
  heartbeat_timeout      = var.terminating_hook_heartbeat_timeout_seconds
  default_result         = "CONTINUE"
}
