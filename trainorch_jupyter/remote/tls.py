"""The channel to a remote runner: TLS with key material made per job by the orchestrator, pinned.

The orchestrator makes an EC P-256 key and a self-signed certificate for each job (:func:`new_channel_keys`);
the key travels to the machine inside the stage-0 start command, over the provider's HTTPS API (the provider
owns the machine anyway), and the runner serves HTTPS with it (stdlib ``ssl``). The client trusts that one
certificate and nothing else (:func:`pinned_ssl_context`): no public CA, no system store, so whoever sits in
between (a proxy, a hijacked IP:port, a provider's TLS-terminating front) cannot present a certificate the
client accepts without the job's private key, never sees the bearer token, and cannot serve bytes and hashes
of its own. ``docs/PROTOCOL.md`` section 4 ("Channel") says why this is safe.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import httpx

#: The certificate's subject and issuer common name. Hostnames are not checked (the machine's public
#: IP is known only after the certificate is made): the pin is the certificate itself.
CERT_COMMON_NAME = "trainorch-runner"
#: How long a job's certificate is valid. The pin, not the date, is what protects the channel; the window
#: only has to outlive any job (the client checks it at each handshake) and tolerate a skewed clock.
CERT_VALIDITY = datetime.timedelta(days=400)
CERT_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class ChannelKeys:
    """One job's TLS key material. ``cert_pem`` (and its fingerprint) is public: store it with the job's
    machine data, it is the pin. ``key_pem`` is a secret: it goes only into the stage-0 command, and
    ``repr`` never shows it."""

    cert_pem: str
    key_pem: str = field(repr=False)
    fingerprint_sha256: str

    def cert_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert_pem)

    def key_der(self) -> bytes:
        """The private key as the shortest PKCS#8 DER OpenSSL loads: the curve and the secret scalar, without
        the public point (OpenSSL derives it). 67 bytes instead of 138: it travels in the stage-0 command."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(self.key_pem.encode("ascii"), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("the channel key must be an EC P-256 key")
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        return _P256_PKCS8_PREFIX + scalar


#: PKCS#8 PrivateKeyInfo { version 0, AlgorithmIdentifier { id-ecPublicKey, prime256v1 },
#: OCTET STRING { ECPrivateKey { version 1, OCTET STRING (32 bytes) } } }, up to the 32 secret bytes.
_P256_PKCS8_PREFIX = bytes.fromhex(
    "3041" "020100" "3013" "06072a8648ce3d0201" "06082a8648ce3d030107" "0427" "3025" "020101" "0420"
)


def cert_fingerprint(cert_pem: str) -> str:
    """Hex SHA-256 of the DER certificate."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest()


def new_channel_keys() -> ChannelKeys:
    """A fresh EC P-256 key and a self-signed certificate (CN ``trainorch-runner``, not a CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERT_COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(8), "big") >> 1 | 1)  # 63 random bits: short, positive, non-zero
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        # Not a CA: the pinned certificate can vouch for nothing but itself. (Few extensions: the certificate
        # travels in the stage-0 command, whose every byte counts.)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return ChannelKeys(cert_pem=cert_pem, key_pem=key_pem, fingerprint_sha256=cert_fingerprint(cert_pem))


def pinned_ssl_context(cert_pem: str) -> ssl.SSLContext:
    """A client context whose only trust anchor is ``cert_pem``: no system store, no public CA.

    The hostname is not checked (a machine's IP is not known when its certificate is made, and a relay or a
    provider's port mapping changes the address anyway); the certificate chain must end in exactly this
    certificate, which only the holder of the job's private key can present. TLS 1.2 at least.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    return ctx


def runner_http_client(cert_pem: str | None, **kw: Any) -> httpx.AsyncClient:
    """A fresh HTTP client for one job's runner: pinned to ``cert_pem`` (plain HTTP when None, for a runner
    on loopback). It never takes settings from the environment (proxies, ``SSL_CERT_FILE``, .netrc) and
    carries no default headers: the runner's token goes per request (``RunnerClient``), and a provider API's
    client, which holds the provider key, is never this one. ``kw`` goes to ``httpx.AsyncClient``
    (``timeout``, ``limits``, ...)."""
    if "verify" in kw or "trust_env" in kw:
        raise TypeError("runner_http_client sets verify and trust_env itself")
    kw.setdefault("timeout", httpx.Timeout(30.0))
    verify: ssl.SSLContext | bool = pinned_ssl_context(cert_pem) if cert_pem is not None else True
    return httpx.AsyncClient(verify=verify, trust_env=False, **kw)
