# A complete meshgate deployment into an existing VPC: the fleet behind an internal NLB, private
# DNS for the mesh names in the VMs' VPCs, and meshgate-autoscaler sizing the fleet. The same NLB
# also carries the other direction (mesh workloads calling VM services, mesh_inbound).

module "fleet" {
  source = "../../modules/fleet"

  name                            = var.name
  vpc_id                          = var.vpc_id
  subnet_ids                      = var.subnet_ids
  vm_cidrs                        = var.vm_cidrs
  admin_source_security_group_ids = var.monitoring_security_group_ids
  mesh_gateways                   = var.mesh_gateways
  mesh_gateway_cidrs              = var.mesh_gateway_cidrs
  trust_domain                    = var.trust_domain
  spiffe_id                       = var.spiffe_id
  services                        = var.services
  tenants                         = var.tenants
  mesh_inbound                    = var.mesh_inbound
  vm_services                     = var.vm_services
  proxy_protocol_v2               = var.proxy_protocol_v2
  ami_id                          = var.ami_id
  instance_type                   = var.instance_type
  min_size                        = var.min_size
  max_size                        = var.max_size
  binary_s3_uri                   = var.meshgate_binary_s3_uri
  binary_sha256                   = var.meshgate_binary_sha256
  identity_source                 = "secretsmanager"
  identity_secret_arn             = var.identity_secret_arn
  admin_token_secret_arn          = var.admin_token_secret_arn
  launching_hook_enabled          = true
  tags                            = var.tags
}

module "dns" {
  source = "../../modules/dns"

  zone_names   = var.mesh_zone_names
  vpc_ids      = var.vm_vpc_ids
  record_names = var.dns_record_names == null ? module.fleet.service_names : var.dns_record_names
  nlb_dns_name = module.fleet.nlb_dns_name
  nlb_zone_id  = module.fleet.nlb_zone_id
  tags         = var.tags
}

module "autoscaler" {
  source = "../../modules/autoscaler"

  name                                     = "${var.name}-autoscaler"
  vpc_id                                   = var.vpc_id
  subnet_ids                               = var.subnet_ids
  ami_id                                   = var.ami_id
  binary_s3_uri                            = var.autoscaler_binary_s3_uri
  binary_sha256                            = var.autoscaler_binary_sha256
  prometheus_url                           = var.prometheus_url
  prometheus_cidrs                         = var.prometheus_cidrs
  group_name                               = module.fleet.autoscaling_group_name
  group_arn                                = module.fleet.autoscaling_group_arn
  admin_port                               = module.fleet.admin_port
  admin_client_security_group_id           = module.fleet.admin_client_security_group_id
  admin_token_secret_arn                   = var.admin_token_secret_arn
  fleet_drain_timeout_seconds              = module.fleet.drain_timeout_seconds
  lifecycle_hook_heartbeat_timeout_seconds = module.fleet.terminating_hook_heartbeat_timeout_seconds
  target                                   = var.autoscaler_target
  min_capacity                             = var.min_size
  max_capacity                             = var.max_size
  monitoring_security_group_ids            = var.monitoring_security_group_ids
  tags                                     = var.tags
}
