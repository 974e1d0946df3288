/*
 * A statsd backend that sends nothing: on every flush it adds up what statsd counted as received
 * (statsd.packets_received, statsd.metrics_received, statsd.bad_lines_seen) and writes the running
 * totals as JSON to config.blackhole.file, so bench/run.py can compare them with what it sent.
 * SIGTERM makes the process exit normally, which runs statsd's own exit hook: one last flush, so
 * the file holds every line received up to the end.
 */
'use strict';

const fs = require('fs');

exports.init = function (startupTime, config, events) {
  const out = config.blackhole && config.blackhole.file;
  if (!out) {
    return false;
  }
  const prefix = config.prefixStats !== undefined ? config.prefixStats : 'statsd';
  const totals = { flushes: 0, packets_received: 0, metrics_received: 0, bad_lines_seen: 0, series: 0 };

  events.on('flush', function (timestamp, metrics) {
    const c = metrics.counters;
    totals.flushes += 1;
    totals.packets_received += c[prefix + '.packets_received'] || 0;
    totals.metrics_received += c[prefix + '.metrics_received'] || 0;
    totals.bad_lines_seen += c[prefix + '.bad_lines_seen'] || 0;
    totals.series = Object.keys(c).length + Object.keys(metrics.timers).length +
      Object.keys(metrics.gauges).length + Object.keys(metrics.sets).length;
    fs.writeFileSync(out + '.tmp', JSON.stringify(totals));
    fs.renameSync(out + '.tmp', out);
  });

  process.on('SIGTERM', function () {
    process.exit(0);
  });
  return true;
};
