"""The per-Service certificates the operator issues (kubeforge.tls)."""

from __future__ import annotations

import datetime

from cryptography import x509

from kubeforge import tls


def test_a_services_certificate_names_it_and_is_signed_by_its_own_ca() -> None:
    now = datetime.datetime.now(datetime.UTC)
    issued = tls.issue("svc", "team-a", now)
    ca = x509.load_pem_x509_certificate(issued[tls.KEY_CA])
    cert = x509.load_pem_x509_certificate(issued[tls.KEY_CERT])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject and cert.subject != ca.subject
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["svc.team-a.replicas.kubeforge.internal"]
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=3000)
    longest = tls.issue("s" * 63, "n" * 63, now)  # names as long as Kubernetes allows
    assert x509.load_pem_x509_certificate(longest[tls.KEY_CERT])
    other = tls.issue("svc", "team-a", now)  # every Service gets a CA of its own
    assert other[tls.KEY_CA] != issued[tls.KEY_CA]


def test_a_service_with_tls_mounts_its_secret_and_is_probed_over_https() -> None:
    from kubeforge.operator import manifests as m

    body = {
        "apiVersion": "kubeforge.dev/v1alpha1",
        "kind": "Service",
        "metadata": {"name": "svc", "namespace": "ns", "uid": "u"},
        "spec": {"actor": "examples.echo:Echo"},
    }
    plain = m.replica_pod(m.resolve_defaults(body, tls_default=False), 0)
    assert "kubeforge-tls" not in {v["name"] for v in plain["spec"]["volumes"]}
    secure_body = m.resolve_defaults(body, tls_default=True)
    assert secure_body["spec"]["tls"] == {"enabled": True}
    assert body["spec"] == {"actor": "examples.echo:Echo"}  # the watched object is untouched
    pod = m.replica_pod(secure_body, 0)
    (container,) = pod["spec"]["containers"]
    assert {"name": "KUBEFORGE_TLS_DIR", "value": "/var/run/kubeforge/tls"} in container["env"]
    assert {p["httpGet"]["scheme"] for k, p in container.items() if k.endswith("Probe")} == {
        "HTTPS"
    }
    # The port is named for what it speaks: the chart's PodMonitor scrapes `https` over TLS.
    assert container["ports"] == [{"name": "https", "containerPort": 8000}]
    assert plain["spec"]["containers"][0]["ports"] == [{"name": "http", "containerPort": 8000}]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "kubeforge-tls")
    assert volume["secret"] == {"secretName": "svc-tls"}
    deployment, _ = m.router_objects(secure_body)
    router_volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "kubeforge-tls"
    )
    assert router_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    # The spec's own word beats the operator's default, and changes the template (a rollout).
    said = {**body, "spec": {**body["spec"], "tls": {"enabled": False}}}
    assert m.resolve_defaults(said, tls_default=True) is said
    assert m.template_hash(m.pod_template(secure_body)) != m.template_hash(
        m.pod_template(m.resolve_defaults(said, True))
    )


def test_an_issuer_in_the_spec_asks_cert_manager_for_the_same_secret() -> None:
    from kubeforge.operator import manifests as m

    ref = {"name": "ca-issuer"}
    body = {
        "apiVersion": "kubeforge.dev/v1alpha1",
        "kind": "Service",
        "metadata": {"name": "svc", "namespace": "ns", "uid": "u"},
        "spec": {"actor": "examples.echo:Echo", "tls": {"issuerRef": ref}},
    }
    # Naming an issuer asks for TLS, whatever the operator's default.
    resolved = m.resolve_defaults(body, tls_default=False)
    assert resolved["spec"]["tls"] == {"issuerRef": ref, "enabled": True}
    cert = m.tls_certificate(resolved)
    assert cert is not None
    assert (cert["apiVersion"], cert["kind"]) == ("cert-manager.io/v1", "Certificate")
    assert cert["metadata"]["name"] == "svc-tls"
    assert cert["metadata"]["ownerReferences"][0]["uid"] == "u"  # goes with the Service
    assert cert["spec"]["secretName"] == "svc-tls"  # what the pods mount either way
    assert cert["spec"]["dnsNames"] == [tls.server_name("svc", "ns")]
    assert cert["spec"]["issuerRef"] == {
        "name": "ca-issuer",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    # The pods are the same as with the operator's own CA: the issuer is not a rollout.
    own = {**body, "spec": {"actor": "examples.echo:Echo", "tls": {"enabled": True}}}
    assert m.pod_template(resolved) == m.pod_template(m.resolve_defaults(own, False))
    # No issuer, or TLS off by the spec's word: no Certificate.
    assert m.tls_certificate(m.resolve_defaults(own, False)) is None
    off = {**body, "spec": {**body["spec"], "tls": {"issuerRef": ref, "enabled": False}}}
    assert m.tls_certificate(m.resolve_defaults(off, True)) is None
    # Before cert-manager issues, the operator's Secret holds every key, empty.
    assert m.tls_secret(resolved, tls.PENDING)["data"] == {
        "ca.crt": "",
        "tls.crt": "",
        "tls.key": "",
    }


def test_renewals_come_from_one_ca_each_with_a_key_of_its_own() -> None:
    first, second = tls.issue_series("svc", "ns", datetime.datetime.now(datetime.UTC), 2)
    assert first[tls.KEY_CA] == second[tls.KEY_CA]
    assert first[tls.KEY_KEY] != second[tls.KEY_KEY]
    ca = x509.load_pem_x509_certificate(first[tls.KEY_CA])
    for issued in (first, second):
        x509.load_pem_x509_certificate(issued[tls.KEY_CERT]).verify_directly_issued_by(ca)
