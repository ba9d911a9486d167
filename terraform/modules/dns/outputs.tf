output "zone_ids" {
  description = "Hosted zone id per mesh domain."
  value       = { for z, zone in aws_route53_zone.mesh : z => zone.zone_id }
}

output "record_fqdns" {
  description = "The names that now resolve to the NLB."
  value       = sort([for r in aws_route53_record.service : r.fqdn])
}
