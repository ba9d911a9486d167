output "nlb_dns_name" {
  description = "The internal NLB VMs reach meshgate through (the service names resolve to it)."
  value       = module.fleet.nlb_dns_name
}

output "mesh_inbound_port" {
  description = "Port of meshgate's mesh-inbound listener on the NLB (nlb_dns_name): the endpoint of the ServiceEntries in infra/istio/inbound; null when off."
  value       = module.fleet.mesh_inbound_port
}

output "autoscaling_group_name" {
  description = "The fleet's Auto Scaling group (Prometheus discovers it by the aws:autoscaling:groupName tag)."
  value       = module.fleet.autoscaling_group_name
}

output "service_names" {
  description = "Names that resolve to the NLB in the VM VPCs."
  value       = module.dns.record_fqdns
}

output "zone_ids" {
  description = "Private hosted zone per mesh domain."
  value       = module.dns.zone_ids
}

output "admin_client_security_group_id" {
  description = "Attach to the Prometheus hosts so they can scrape the fleet's admin port."
  value       = module.fleet.admin_client_security_group_id
}

output "meshgate_config" {
  description = "The meshgate.yaml the instances run."
  value       = module.fleet.meshgate_config
}

output "autoscaler_config" {
  description = "The autoscaler.yaml the autoscaler runs."
  value       = module.autoscaler.autoscaler_config
}
