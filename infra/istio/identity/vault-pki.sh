#!/usr/bin/env bash
# A plugged-in intermediate through Vault PKI: one mesh root signs both istiod's CA (Istio's
# `cacerts` secret) and a Vault PKI intermediate that issues meshgate's certificates, so sidecars
# (trusting the root) accept meshgate and meshgate (trusting the root) accepts sidecars.
# The fleet module's identity_source = vault-agent then has every instance's Vault agent issue
# and renew its certificate (pkiCert on pki_meshgate/issue/meshgate).
#
# Run with a Vault token allowed to mount engines and write policies, and kubectl on the cluster.
# Values to adapt: TRUST_DOMAIN, SPIFFE_ID, FLEET_ROLE_ARN (fleet output instance_role_arn).
set -euo pipefail
TRUST_DOMAIN=${TRUST_DOMAIN:-cluster.local}
SPIFFE_ID=${SPIFFE_ID:-spiffe://$TRUST_DOMAIN/ns/meshgate/sa/meshgate}
FLEET_ROLE_ARN=${FLEET_ROLE_ARN:?the fleet instances IAM role ARN (fleet output instance_role_arn)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The mesh root (keep it offline if you can; here it stays in Vault, never exported).
vault secrets enable -path=pki_root pki
vault secrets tune -max-lease-ttl=87600h pki_root
vault write -field=certificate pki_root/root/generate/internal \
  common_name="$TRUST_DOMAIN mesh root" ttl=87600h key_type=ec key_bits=256 > "$work/root-cert.pem"

# 2. istiod's intermediate: its key must go into the cacerts secret, so it is made here.
openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca-key.pem"
openssl req -new -key "$work/ca-key.pem" -subj "/O=$TRUST_DOMAIN/CN=istiod intermediate" -out "$work/istiod.csr"
vault write -field=certificate pki_root/root/sign-intermediate csr=@"$work/istiod.csr" \
  common_name="istiod intermediate" ttl=43800h format=pem > "$work/ca-cert.pem"
cat "$work/ca-cert.pem" "$work/root-cert.pem" > "$work/cert-chain.pem"
kubectl create namespace istio-system --dry-run=client -o yaml | kubectl apply -f -
kubectl -n istio-system create secret generic cacerts \
  --from-file=ca-cert.pem="$work/ca-cert.pem" --from-file=ca-key.pem="$work/ca-key.pem" \
  --from-file=root-cert.pem="$work/root-cert.pem" --from-file=cert-chain.pem="$work/cert-chain.pem"
# (restart istiod, then the workloads, to move them onto the plugged-in CA)

# 3. meshgate's intermediate, kept inside Vault.
vault secrets enable -path=pki_meshgate pki
vault secrets tune -max-lease-ttl=43800h pki_meshgate
vault write -field=csr pki_meshgate/intermediate/generate/internal \
  common_name="meshgate intermediate" key_type=ec key_bits=256 > "$work/meshgate-int.csr"
vault write -field=certificate pki_root/root/sign-intermediate csr=@"$work/meshgate-int.csr" \
  common_name="meshgate intermediate" ttl=43800h format=pem > "$work/meshgate-int.pem"
vault write pki_meshgate/intermediate/set-signed certificate=@"$work/meshgate-int.pem"

# Shaped like Istio's workload certificates: no subject, exactly the one URI SAN, EC P-256,
# client and server auth, short-lived.
vault write pki_meshgate/roles/meshgate \
  allowed_uri_sans="$SPIFFE_ID" require_cn=false allow_any_name=false allowed_domains="" \
  key_type=ec key_bits=256 server_flag=true client_flag=true \
  ttl=24h max_ttl=72h no_store=true

# 4. The fleet's instances log in with their IAM role and may only issue and read the root.
vault policy write meshgate-pki - <<'POLICY'
path "pki_meshgate/issue/meshgate" { capabilities = ["update"] }
path "pki_root/cert/ca" { capabilities = ["read"] }
POLICY
vault auth enable aws
vault write auth/aws/role/meshgate auth_type=iam \
  bound_iam_principal_arn="$FLEET_ROLE_ARN" token_policies=meshgate-pki token_ttl=1h token_max_ttl=24h

# The fleet module then takes:
#   identity_source = "vault-agent"
#   vault = { address = "https://vault.example.internal:8200", auth_role = "meshgate",
#             pki_issue_path = "pki_meshgate/issue/meshgate", root_ca_path = "pki_root/cert/ca",
#             egress_cidrs = ["10.0.50.0/24"] }
