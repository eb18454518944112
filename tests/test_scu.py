"""Our SCU's socket tuning, on a real loopback association."""
from __future__ import annotations

import socket

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.dicom.scu import no_delay
from nodeutil import free_port


def test_no_delay_switches_nagle_off_on_an_established_association() -> None:
    port = free_port()
    scp = AE(ae_title="PEER")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        scu = AE(ae_title="US")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="PEER")
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # pynetdicom's default
        no_delay(assoc)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        server.shutdown()
