# Exactly the AWS calls meshgate-autoscaler makes (infra/autoscaler/src/asg.rs; a test compares
# this list with the source):
#   autoscaling:DescribeAutoScalingGroups, autoscaling:DescribeLifecycleHooks, ec2:DescribeInstances
#     - read-only, and these actions have no resource-level permissions, so "*";
#   autoscaling:SetDesiredCapacity, autoscaling:CompleteLifecycleAction,
#   autoscaling:RecordLifecycleActionHeartbeat
#     - on the fleet's group only.
# Plus what the bootstrap reads once: the binary object and the admin token secret.

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    sid     = "Ec2AssumeRole"
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  name_prefix        = "${var.name}-"
  description        = "meshgate-autoscaler for ${var.group_name}"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "ReadGroupState"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeLifecycleHooks",
      "ec2:DescribeInstances",
    ]
    resources = ["*"]
  }

  statement {
    sid = "ActOnFleetGroup"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:CompleteLifecycleAction",
      "autoscaling:RecordLifecycleActionHeartbeat",
    ]
    resources = [var.group_arn]
  }

  dynamic "statement" {
    for_each = var.binary_s3_uri == null ? [] : ["binary"]
    content {
      sid       = "BootstrapReadBinary"
      actions   = ["s3:GetObject"]
      resources = ["arn:${data.aws_partition.current.partition}:s3:::${local.binary_s3_bucket}/${local.binary_s3_key}"]
    }
  }

  dynamic "statement" {
    for_each = var.admin_token_secret_arn == null ? [] : ["token"]
    content {
      sid       = "BootstrapReadAdminToken"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = [var.admin_token_secret_arn]
    }
  }
}

resource "aws_iam_role_policy" "autoscaler" {
  name   = "meshgate-autoscaler"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "this" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.this.name
  tags        = local.tags
}
