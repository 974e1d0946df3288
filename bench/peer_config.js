/*
 * Etsy statsd configuration for bench/run.py (the peer). statsd eval()s this file, so the values
 * that change per run come from the environment bench/run.py sets:
 *   HW_PEER_PORT      UDP port to listen on (127.0.0.1)
 *   HW_PEER_MGMT_PORT management TCP port (127.0.0.1)
 *   HW_PEER_BACKEND   absolute path of bench/peer_blackhole_backend.js
 *   HW_PEER_OUT       file the blackhole backend writes its counts to
 *   HW_PEER_FLUSH_MS  flush interval in ms (10000 unless set; the --quick memory run shortens it)
 * The stock UDP server is used: statsd 0.9 has no receive-buffer option, so the socket gets the
 * kernel default (net.core.rmem_default).
 */
{
  port: Number(process.env.HW_PEER_PORT),
  address: "127.0.0.1",
  mgmt_address: "127.0.0.1",
  mgmt_port: Number(process.env.HW_PEER_MGMT_PORT),
  flushInterval: Number(process.env.HW_PEER_FLUSH_MS || 10000),
  backends: [process.env.HW_PEER_BACKEND],
  blackhole: { file: process.env.HW_PEER_OUT },
  automaticConfigReload: false
}
