# meshgate-autoscaler on one instance (an Auto Scaling group of exactly one, so a lost instance is
# replaced): Prometheus load -> the fleet group's desired capacity, and drain before scale-in.

data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  tags = merge(var.tags, { "meshgate:role" = "autoscaler" })

  admin_token_file = var.admin_token_secret_arn == null ? null : "/etc/meshgate-autoscaler/admin-token"

  autoscaler_config = templatefile("${path.module}/templates/autoscaler.yaml.tftpl", {
    prometheus_url             = var.prometheus_url
    region                     = data.aws_region.current.name
    interval                   = var.interval
    dry_run                    = var.dry_run
    metrics_port               = var.metrics_port
    group_name                 = var.group_name
    query                      = var.query
    target                     = var.target
    extra_signals              = var.extra_signals
    min_capacity               = var.min_capacity
    max_capacity               = var.max_capacity
    scale_down_stabilization   = var.scale_down_stabilization
    warm_up                    = var.warm_up
    admin_port                 = var.admin_port
    admin_token_file           = local.admin_token_file
    drain_timeout_seconds      = var.drain_timeout_seconds
    heartbeat_interval_seconds = var.heartbeat_interval_seconds
  })

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    region                 = data.aws_region.current.name
    autoscaler_config      = local.autoscaler_config
    binary_s3_uri          = var.binary_s3_uri
    binary_url             = var.binary_url
    binary_sha256          = var.binary_sha256
    admin_token_secret_arn = var.admin_token_secret_arn
    admin_token_file       = local.admin_token_file
  })

  binary_s3_bucket = var.binary_s3_uri == null ? null : split("/", trimprefix(var.binary_s3_uri, "s3://"))[0]
  binary_s3_key    = var.binary_s3_uri == null ? null : join("/", slice(split("/", trimprefix(var.binary_s3_uri, "s3://")), 1, length(split("/", trimprefix(var.binary_s3_uri, "s3://")))))

  prometheus_url_parts = regex("^(https?)://[^/:]+(:[0-9]+)?", var.prometheus_url)
  prometheus_port      = coalesce(try(tonumber(trimprefix(local.prometheus_url_parts[1], ":")), null), local.prometheus_url_parts[0] == "https" ? 443 : 80)
}

resource "aws_security_group" "this" {
  name_prefix = "${var.name}-"
  description = "meshgate-autoscaler: Prometheus, AWS APIs, metrics port from monitoring"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = var.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "prometheus" {
  for_each = toset(var.prometheus_cidrs)

  security_group_id = aws_security_group.this.id
  description       = "Autoscaler to Prometheus HTTP API"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = local.prometheus_port
  to_port           = local.prometheus_port
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.https_egress_cidrs)

  security_group_id = aws_security_group.this.id
  description       = "Autoscaler to the Auto Scaling, EC2, S3 and Secrets Manager APIs"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  for_each = { for i, sg in var.monitoring_security_group_ids : tostring(i) => sg }

  security_group_id            = aws_security_group.this.id
  description                  = "Monitoring to the autoscaler's /metrics"
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  tags                         = local.tags
}

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-"
  description            = "meshgate-autoscaler for ${var.group_name}"
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
    security_groups             = [aws_security_group.this.id, var.admin_client_security_group_id]
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
    device_name = "/dev/xvda"

    ebs {
      volume_size           = 8
      volume_type           = "gp3"
      encrypted             = true
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
      condition     = var.min_capacity <= var.max_capacity
      error_message = "min_capacity must not exceed max_capacity."
    }
    precondition {
      condition     = var.drain_timeout_seconds > var.fleet_drain_timeout_seconds
      error_message = "drain_timeout_seconds must exceed the fleet's drain timeout, or the autoscaler completes the lifecycle action while meshgate still drains."
    }
    precondition {
      condition     = var.heartbeat_interval_seconds < var.lifecycle_hook_heartbeat_timeout_seconds
      error_message = "heartbeat_interval_seconds must stay below the lifecycle hook's heartbeat timeout."
    }
  }
}

resource "aws_autoscaling_group" "this" {
  name                = var.name
  vpc_zone_identifier = var.subnet_ids
  min_size            = 1
  max_size            = 1
  desired_capacity    = 1
  health_check_type   = "EC2"

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  # One controller at a time: the old instance goes before the new one starts.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 0
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
