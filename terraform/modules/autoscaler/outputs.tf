output "security_group_id" {
  description = "Security group of the autoscaler instance."
  value       = aws_security_group.this.id
}

output "autoscaling_group_name" {
  description = "Name of the autoscaler's own one-instance Auto Scaling group."
  value       = aws_autoscaling_group.this.name
}

output "role_name" {
  description = "Name of the autoscaler's IAM role."
  value       = aws_iam_role.this.name
}

output "metrics_port" {
  description = "Port of the autoscaler's /metrics and /healthz on its instance."
  value       = var.metrics_port
}

output "autoscaler_config" {
  description = "The rendered autoscaler.yaml (check it with `meshgate-autoscaler check -c`)."
  value       = local.autoscaler_config
}
