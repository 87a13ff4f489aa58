//! Recording a node's trace while the guest runs: vCPU and transport threads push events
//! into a shared buffer (one short lock, no I/O); a writer thread turns full buffers into
//! event blocks on disk.

use crate::trace::{Event, TraceMeta, TraceWriter, BLOCK_EVENTS};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// See the module documentation.
pub struct Recorder {
    buffer: Mutex<Vec<Event>>,
    tx: Mutex<Option<SyncSender<Vec<Event>>>>,
    writer: Mutex<Option<JoinHandle<std::io::Result<u64>>>>,
    path: PathBuf,
}

impl Recorder {
    /// Creates the file and starts the writer thread.
    pub fn create(path: &Path, meta: &TraceMeta) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        let mut w = TraceWriter::new(BufWriter::with_capacity(1 << 20, file), meta)?;
        // A few blocks in flight at most: a stalled disk slows recording down rather
        // than growing memory without bound.
        let (tx, rx) = sync_channel::<Vec<Event>>(8);
        let writer = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || {
                for events in rx {
                    w.write_events(&events)?;
                }
                let n = w.events_written();
                w.finish()?;
                Ok(n)
            })?;
        Ok(Recorder {
            buffer: Mutex::new(Vec::with_capacity(BLOCK_EVENTS)),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path: path.to_path_buf(),
        })
    }

    pub fn record(&self, e: Event) {
        let mut b = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        b.push(e);
        if b.len() >= BLOCK_EVENTS {
            // Sent under the buffer's lock, so blocks reach the file in recording order.
            let full = std::mem::replace(&mut *b, Vec::with_capacity(BLOCK_EVENTS));
            self.send(full);
        }
    }

    fn send(&self, events: Vec<Event>) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // A failed writer reports its error at finish.
            let _ = tx.send(events);
        }
    }

    /// Writes what is buffered and the end block; returns the events written. Later
    /// events are dropped.
    pub fn finish(&self) -> Result<u64, String> {
        {
            let mut b = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let rest = std::mem::take(&mut *b);
            if !rest.is_empty() {
                self.send(rest);
            }
        }
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(writer) = writer else {
            return Err("trace already finished".into());
        };
        match writer.join() {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(format!("writing trace {}: {e}", self.path.display())),
            Err(_) => Err(format!("trace writer for {} panicked", self.path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{read_file, EventKind, NONE16};
    use std::sync::Arc;

    #[test]
    fn threads_record_into_one_valid_file() {
        let path = std::env::temp_dir().join(format!("flotilla-rec-{}.ftrace", std::process::id()));
        let meta = TraceMeta {
            nodes: 1,
            vcpus: 4,
            ..Default::default()
        };
        let r = Arc::new(Recorder::create(&path, &meta).unwrap());
        let threads: Vec<_> = (0..4u16)
            .map(|v| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    for i in 0..25_000u64 {
                        r.record(Event {
                            t_ns: i,
                            page: i,
                            vcpu: v,
                            peer: NONE16,
                            replicas: NONE16,
                            kind: EventKind::AccessSample as u8,
                            ..Default::default()
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.finish().unwrap(), 100_000);
        let t = read_file(&path).unwrap();
        assert_eq!(t.events.len(), 100_000);
        for v in 0..4 {
            let mine: Vec<u64> = t
                .events
                .iter()
                .filter(|e| e.vcpu == v)
                .map(|e| e.page)
                .collect();
            assert_eq!(
                mine,
                (0..25_000).collect::<Vec<_>>(),
                "vCPU {v}'s events out of order or lost"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}
