"""TLS with client-certificate verification, and the association limit, over real sockets."""
from __future__ import annotations

import ssl
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from nodeutil import MR, NODE_AET, NodeProcess, associate, mr_dataset, wait_until


def tls_associate(port: int, pki: Path, client_cert: bool):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MR, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=(ctx, "127.0.0.1"))


def test_tls_with_client_certificate_verification(tmp_path: Path, pki: Path) -> None:
    tls = {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key"),
           "ca_file": str(pki / "ca.pem"), "require_client_cert": True}
    node = NodeProcess(tmp_path / "data", tls=tls).start()
    try:
        assoc = tls_associate(node.port, pki, client_cert=True)
        assert assoc.is_established
        assert int(assoc.send_c_store(mr_dataset(generate_uid(), generate_uid())).Status) == 0
        assoc.release()
        # no client certificate: the TLS handshake fails, no association
        assert not tls_associate(node.port, pki, client_cert=False).is_established
        # plain TCP to a TLS port: no association
        assert not associate(node.port).is_established
        assert node.proc is not None and node.proc.poll() is None
        assert len(node.spool_files()) == 1
    finally:
        node.stop()


def test_association_limit_rejects_the_extra_one(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", max_associations=2).start()
    try:
        a, b = associate(node.port), associate(node.port)
        assert a.is_established and b.is_established
        c = associate(node.port)
        assert c.is_rejected
        a.release()
        # the released association's thread ends asynchronously; a slot frees up after it: poll for that
        d = wait_until(lambda: (lambda x: x if x.is_established else None)(associate(node.port)), every=0.1,
                       what="a free association slot after a release")
        assert d.is_established
        b.release()
        d.release()
    finally:
        node.stop()
