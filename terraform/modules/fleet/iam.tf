# The instances may read exactly: the binary object (when it comes from S3), the identity secret or
# its three parameters, the admin token secret, and decrypt with the identity KMS key through
# those services. Nothing else (Vault auth signs sts:GetCallerIdentity, which needs no grant).

locals {
  identity_parameter_arns = var.identity_ssm_prefix == null ? [] : [
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] :
    "arn:${data.aws_partition.current.partition}:ssm:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:parameter${var.identity_ssm_prefix}/${f}"
  ]
  read_secret_arns = compact([
    var.identity_source == "secretsmanager" ? var.identity_secret_arn : "",
    var.admin_token_secret_arn == null ? "" : var.admin_token_secret_arn,
  ])
  kms_via_services = compact([
    length(local.read_secret_arns) > 0 ? "secretsmanager.${data.aws_region.current.name}.amazonaws.com" : "",
    var.identity_source == "ssm" ? "ssm.${data.aws_region.current.name}.amazonaws.com" : "",
  ])
  instance_policy_needed = var.binary_s3_uri != null || length(local.read_secret_arns) > 0 || var.identity_source == "ssm"
}

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

resource "aws_iam_role" "instance" {
  name_prefix        = "${var.name}-"
  description        = "meshgate fleet ${var.name} instances"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "instance" {
  dynamic "statement" {
    for_each = var.binary_s3_uri == null ? [] : ["binary"]
    content {
      sid       = "ReadMeshgateBinary"
      actions   = ["s3:GetObject"]
      resources = ["arn:${data.aws_partition.current.partition}:s3:::${local.binary_s3_bucket}/${local.binary_s3_key}"]
    }
  }

  dynamic "statement" {
    for_each = length(local.read_secret_arns) == 0 ? [] : ["secrets"]
    content {
      sid       = "ReadIdentityAndAdminToken"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = local.read_secret_arns
    }
  }

  dynamic "statement" {
    for_each = var.identity_source == "ssm" ? ["ssm"] : []
    content {
      sid       = "ReadIdentityParameters"
      actions   = ["ssm:GetParameter"]
      resources = local.identity_parameter_arns
    }
  }

  dynamic "statement" {
    for_each = var.identity_kms_key_arn == null || length(local.kms_via_services) == 0 ? [] : ["kms"]
    content {
      sid       = "DecryptIdentity"
      actions   = ["kms:Decrypt"]
      resources = [var.identity_kms_key_arn]
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = local.kms_via_services
      }
    }
  }
}

resource "aws_iam_role_policy" "instance" {
  count  = local.instance_policy_needed ? 1 : 0
  name   = "meshgate-bootstrap"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.instance.json
}

resource "aws_iam_role_policy_attachment" "ssm_core" {
  count      = var.ssm_session_manager ? 1 : 0
  role       = aws_iam_role.instance.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "this" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.instance.name
  tags        = local.tags
}
