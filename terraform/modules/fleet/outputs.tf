output "nlb_arn" {
  description = "ARN of the internal NLB."
  value       = aws_lb.this.arn
}

output "nlb_dns_name" {
  description = "DNS name of the internal NLB (alias target of the service records)."
  value       = aws_lb.this.dns_name
}

output "nlb_zone_id" {
  description = "Route 53 hosted zone id of the NLB, for alias records."
  value       = aws_lb.this.zone_id
}

output "listener_ports" {
  description = "NLB listener ports (the distinct service ports), each forwarding to the proxy port."
  value       = sort([for p in local.listener_ports : tonumber(p)])
}

output "target_group_arn" {
  description = "ARN of the target group of the meshgate instances."
  value       = aws_lb_target_group.proxy.arn
}

output "mesh_inbound_port" {
  description = "NLB listener port of the mesh → VM direction (meshgate's mesh-inbound listener): the ServiceEntry targetPort or network gateway port of infra/istio/inbound, with nlb_dns_name as the address; null when mesh_inbound is off."
  value       = local.inbound_port
}

output "mesh_inbound_target_group_arn" {
  description = "ARN of the target group behind the mesh-inbound listener; null when mesh_inbound is off."
  value       = one(aws_lb_target_group.mesh_inbound[*].arn)
}

output "autoscaling_group_name" {
  description = "Name of the fleet's Auto Scaling group (meshgate-autoscaler's group name, and the aws:autoscaling:groupName tag Prometheus discovers)."
  value       = aws_autoscaling_group.this.name
}

output "autoscaling_group_arn" {
  description = "ARN of the fleet's Auto Scaling group (the autoscaler's IAM is scoped to it)."
  value       = aws_autoscaling_group.this.arn
}

output "terminating_hook_name" {
  description = "Name of the Terminating:Wait lifecycle hook meshgate-autoscaler completes after draining an instance."
  value       = aws_autoscaling_lifecycle_hook.terminating.name
}

output "terminating_hook_heartbeat_timeout_seconds" {
  description = "Heartbeat timeout of the Terminating:Wait hook; meshgate-autoscaler's heartbeat_interval must stay below it."
  value       = aws_autoscaling_lifecycle_hook.terminating.heartbeat_timeout
}

output "instance_security_group_id" {
  description = "Security group of the meshgate instances."
  value       = aws_security_group.instance.id
}

output "nlb_security_group_id" {
  description = "Security group of the NLB."
  value       = aws_security_group.nlb.id
}

output "admin_client_security_group_id" {
  description = "Attach to Prometheus hosts and meshgate-autoscaler: members may reach the admin port."
  value       = aws_security_group.admin_client.id
}

output "instance_role_arn" {
  description = "ARN of the instances' IAM role (bind it in Vault's AWS auth role for identity_source = vault-agent)."
  value       = aws_iam_role.instance.arn
}

output "instance_role_name" {
  description = "Name of the instances' IAM role (add grants here, e.g. for a log shipper)."
  value       = aws_iam_role.instance.name
}

output "admin_port" {
  description = "meshgate's admin port on every instance (autoscaler admin_port, Prometheus scrape port)."
  value       = var.admin_port
}

output "proxy_port" {
  description = "meshgate's proxy listener port on every instance."
  value       = var.proxy_port
}

output "drain_timeout_seconds" {
  description = "meshgate's drain.timeout; meshgate-autoscaler's drain_timeout must exceed it."
  value       = var.drain_timeout_seconds
}

output "service_names" {
  description = "Every host and alias of the exposed services: the names the dns module points at the NLB."
  value       = local.service_names
}

output "meshgate_config" {
  description = "The rendered meshgate.yaml the instances run (check it with `meshgate check -c`)."
  value       = local.meshgate_config
}
