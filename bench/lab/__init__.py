"""The mesh lab: real qvacd daemons in separate network namespaces on one Linux machine,
under injected latency, jitter, loss, link cuts, node deaths and a hostile peer.

    sudo python -m bench.lab            # see bench/lab/run.py
"""
