//! Graphite plaintext push, `<prefix>.<vip>.<backend>.<metric> <value> <ts>`,
//! from a thread of its own: carbon being slow or away never stalls lbd,
//! whose runtime is a single thread that blocking socket and file work must
//! not share.
//!
//! What waits for carbon keeps its order and its timestamps: a bounded
//! memory buffer, and behind it, for what memory cannot hold, a bounded
//! gzip spool next to the state file that outlives lbd ([`spool_dir`]).
//! When carbon is back the spool goes first, oldest line first, then
//! memory. At either bound the oldest lines are dropped, and counted
//! ([`Pusher::stats`]).
//!
//! Carbon's line protocol has no acknowledgement: lines written in the
//! moment carbon dies are lost with it. A connection carbon closed is
//! noticed before each write, which covers carbon stopping between pushes.

use std::{
    collections::VecDeque,
    ffi::OsString,
    io::{self, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender},
    },
    time::Duration,
};

use crate::{config::GraphiteConfig, metrics::VipTraffic};

use spool::{Replayed, Spool};

/// A metric path component: Graphite splits on '.', so anything but
/// `[A-Za-z0-9_-]` becomes '_' (`198.18.100.1:80/tcp` -> `198_18_100_1_80_tcp`).
pub fn component(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The lines for one push. VIP totals go under the backend name `all`.
pub fn lines(prefix: &str, snapshot: &[VipTraffic], timestamp: u64) -> Vec<String> {
    let mut out = Vec::new();
    for v in snapshot {
        let vip = component(&v.vip);
        for (metric, value) in [
            ("packets", v.packets),
            ("bytes", v.bytes),
            ("new_flows", v.new_flows),
        ] {
            out.push(format!("{prefix}.{vip}.all.{metric} {value} {timestamp}"));
        }
        for b in &v.backends {
            let backend = component(&b.backend);
            let up = u64::from(b.up);
            for (metric, value) in [
                ("packets", b.packets),
                ("bytes", b.bytes),
                ("new_flows", b.new_flows),
                ("up", up),
                ("weight", b.weight as u64),
            ] {
                out.push(format!(
                    "{prefix}.{vip}.{backend}.{metric} {value} {timestamp}"
                ));
            }
        }
    }
    out
}

/// Where the spool of the lbd whose state file is `state_file` lives: next
/// to that file and named after it, so instances sharing a directory keep
/// apart (`/var/lib/lb/lb0.state.json.graphite-spool/`).
pub fn spool_dir(state_file: &Path) -> PathBuf {
    let mut name = state_file
        .file_name()
        .map_or_else(|| OsString::from("lbd"), OsString::from);
    name.push(".graphite-spool");
    state_file.with_file_name(name)
}

/// What the pusher gave up on and what waits for carbon, for /metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Lines lost for good since lbd started (a counter): the spool's
    /// oldest segments at its bound, a failed spool write, memory overflow
    /// without a spool, batches offered while the pusher was still busy.
    pub dropped_lines: u64,
    /// Lines in the spool now (a gauge).
    pub spooled_lines: u64,
    /// The spool's size on disk now (a gauge).
    pub spool_bytes: u64,
    /// Lines in memory waiting for carbon now (a gauge).
    pub buffered_lines: u64,
}

/// Between lbd's loop and the pusher thread.
#[derive(Default)]
struct Shared {
    dropped: AtomicU64,
    spooled: AtomicU64,
    spool_bytes: AtomicU64,
    buffered: AtomicU64,
    /// lbd is exiting: stop talking to carbon, put what is left on disk.
    closing: AtomicBool,
}

/// A few intervals' worth: covers the pusher being busy for a while (a
/// connect timing out, a spool segment replaying) without holding much.
const QUEUED_BATCHES: usize = 4;

/// lbd's exit waits this long for what carbon has not taken to reach the
/// spool: longer than a carbon write can block, short enough that a stuck
/// disk cannot hold the exit up.
const EXIT_WAIT: Duration = Duration::from_secs(3);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands batches to the pushing thread; never blocks.
pub struct Pusher {
    tx: Option<SyncSender<Vec<String>>>,
    shared: Arc<Shared>,
    done: Option<Receiver<()>>,
}

impl Pusher {
    /// Pushes with the memory buffer only: what overflows it is dropped.
    pub fn spawn(cfg: GraphiteConfig) -> Pusher {
        Pusher::start(cfg, None)
    }

    /// Pushes, spooling what overflows memory to [`spool_dir`]`(state_file)`
    /// (unless `spool_max_bytes` is 0), and first replaying whatever an
    /// earlier lbd left there.
    pub fn spawn_with_spool(cfg: GraphiteConfig, state_file: &Path) -> Pusher {
        let dir = (cfg.spool_max_bytes > 0).then(|| spool_dir(state_file));
        Pusher::start(cfg, dir)
    }

    fn start(cfg: GraphiteConfig, spool_dir: Option<PathBuf>) -> Pusher {
        let (tx, rx) = mpsc::sync_channel(QUEUED_BATCHES);
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("graphite".into())
            .spawn(move || {
                // Opening the spool reads what an earlier lbd left: here,
                // not on lbd's loop.
                let spool = spool_dir.map(|d| Spool::open(d, cfg.spool_max_bytes));
                Worker::new(cfg, spool, theirs).run(&rx);
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            // Every offer then counts as dropped; lbd itself carries on.
            tracing::error!(error = %e, "cannot start the Graphite pusher");
        }
        Pusher {
            tx: Some(tx),
            shared,
            done: Some(done),
        }
    }

    /// Queues a batch; if the pusher is still busy with earlier ones, this
    /// one is dropped and counted.
    pub fn offer(&self, batch: Vec<String>) {
        let n = batch.len() as u64;
        let queued = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(batch).is_ok());
        if !queued {
            self.shared.dropped.fetch_add(n, Relaxed);
        }
    }

    pub fn stats(&self) -> PushStats {
        let s = &self.shared;
        PushStats {
            dropped_lines: s.dropped.load(Relaxed),
            spooled_lines: s.spooled.load(Relaxed),
            spool_bytes: s.spool_bytes.load(Relaxed),
            buffered_lines: s.buffered.load(Relaxed),
        }
    }
}

impl Drop for Pusher {
    /// What carbon has not taken yet goes to the spool, for the next lbd.
    fn drop(&mut self) {
        self.shared.closing.store(true, Relaxed);
        self.tx = None;
        if let Some(done) = self.done.take()
            && let Err(RecvTimeoutError::Timeout) = done.recv_timeout(EXIT_WAIT)
        {
            tracing::warn!(
                "the Graphite pusher did not finish in time; lines in its memory are lost"
            );
        }
    }
}

/// The pushing thread's state.
struct Worker {
    max_buffered: usize,
    carbon: Carbon,
    /// Newer than anything in the spool.
    buffer: VecDeque<String>,
    spool: Option<Spool>,
    shared: Arc<Shared>,
}

impl Worker {
    fn new(cfg: GraphiteConfig, spool: Option<Spool>, shared: Arc<Shared>) -> Worker {
        let mut w = Worker {
            max_buffered: cfg.max_buffered_lines,
            carbon: Carbon {
                address: cfg.address,
                conn: None,
            },
            buffer: VecDeque::new(),
            spool,
            shared,
        };
        w.publish();
        w
    }

    fn run(mut self, rx: &Receiver<Vec<String>>) {
        while let Ok(batch) = rx.recv() {
            self.take(batch);
            if self.closing() {
                break;
            }
            self.push(rx);
            self.publish();
        }
        // Batches still queued are newer than the buffer: they go after it.
        while let Ok(batch) = rx.try_recv() {
            self.take(batch);
        }
        self.close();
    }

    fn closing(&self) -> bool {
        self.shared.closing.load(Relaxed)
    }

    /// Into memory; what no longer fits there, the oldest, to the spool.
    fn take(&mut self, batch: Vec<String>) {
        self.buffer.extend(batch);
        let over = self.buffer.len().saturating_sub(self.max_buffered);
        if over > 0 {
            let oldest: Vec<String> = self.buffer.drain(..over).collect();
            self.spill(&oldest);
        }
    }

    fn spill(&mut self, lines: &[String]) {
        match self.spool.as_mut() {
            Some(spool) => spool.append(lines),
            None => {
                self.shared.dropped.fetch_add(lines.len() as u64, Relaxed);
            }
        }
    }

    fn take_queued(&mut self, rx: &Receiver<Vec<String>>) {
        while let Ok(batch) = rx.try_recv() {
            self.take(batch);
        }
    }

    fn push(&mut self, rx: &Receiver<Vec<String>>) {
        if !self.carbon.ready(self.buffer.len()) {
            return;
        }
        if self.replay(rx) {
            self.send_buffer();
        }
    }

    /// The spool before memory, its lines being older; true once it is
    /// empty. Batches arriving meanwhile are taken between segments, so a
    /// long replay does not make lbd's offers overflow the queue.
    fn replay(&mut self, rx: &Receiver<Vec<String>>) -> bool {
        let Some(waiting) = self.spool.as_ref().map(Spool::lines) else {
            return true;
        };
        loop {
            let Some(spool) = self.spool.as_mut() else {
                return true;
            };
            let carbon = &mut self.carbon;
            match spool.replay_oldest(&mut |text| carbon.send(text)) {
                Replayed::Empty => break,
                Replayed::Failed => return false,
                Replayed::Sent => {}
            }
            self.publish();
            if self.closing() {
                return false;
            }
            self.take_queued(rx);
        }
        if waiting > 0 {
            tracing::info!(lines = waiting, carbon = %self.carbon.address, "Graphite spool replayed");
        }
        true
    }

    fn send_buffer(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let mut text = String::with_capacity(self.buffer.len() * 64);
        for l in &self.buffer {
            text.push_str(l);
            text.push('\n');
        }
        if self.carbon.send(text.as_bytes()) {
            self.buffer.clear();
        }
    }

    /// lbd is exiting: memory to the spool, and the spool's last segment
    /// finished so that the next lbd reads it whole.
    fn close(&mut self) {
        if let Some(spool) = self.spool.as_mut() {
            let left: Vec<String> = self.buffer.drain(..).collect();
            spool.append(&left);
            spool.close();
        }
        self.publish();
    }

    fn publish(&mut self) {
        let s = &self.shared;
        if let Some(spool) = self.spool.as_mut() {
            s.dropped.fetch_add(spool.take_dropped(), Relaxed);
            s.spooled.store(spool.lines(), Relaxed);
            s.spool_bytes.store(spool.bytes(), Relaxed);
        }
        s.buffered.store(self.buffer.len() as u64, Relaxed);
    }
}

/// The connection to carbon's line receiver, made when there is something
/// to send.
struct Carbon {
    address: SocketAddr,
    conn: Option<TcpStream>,
}

impl Carbon {
    /// Whether there is a connection, connecting if needed (one carbon
    /// closed shows at the next [`Carbon::send`]).
    fn ready(&mut self, buffered: usize) -> bool {
        if self.conn.is_some() {
            return true;
        }
        match connect(self.address) {
            Ok(s) => {
                tracing::info!(carbon = %self.address, buffered, "connected to carbon");
                self.conn = Some(s);
                true
            }
            Err(e) => {
                tracing::debug!(carbon = %self.address, error = %e, buffered, "carbon unreachable; keeping lines");
                false
            }
        }
    }

    /// Whether carbon's kernel took `text`; if not, the connection is
    /// dropped and the next push reconnects.
    fn send(&mut self, text: &[u8]) -> bool {
        let Some(s) = self.conn.as_mut() else {
            return false;
        };
        let sent = if closed_by_peer(s) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "closed by carbon",
            ))
        } else {
            s.write_all(text)
        };
        match sent {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(carbon = %self.address, error = %e, "carbon connection lost; keeping lines, reconnecting on the next push");
                self.conn = None;
                false
            }
        }
    }
}

fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(s)
}

/// Carbon never writes on this connection, so anything to read is its
/// close (end of stream or reset). Asked before every write: the first
/// write after carbon went away still lands in our kernel's buffer and
/// would be lost without an error.
fn closed_by_peer(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match s.peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    closed || s.set_nonblocking(false).is_err()
}

/// The spool: what memory could not hold while carbon was away, as gzip
/// segments `<seq>.gz` of newline-ended lines, oldest first.
///
/// Segments keep the bound cheap to hold: the oldest is dropped whole, and
/// nothing is rewritten. Each write is a gzip sync flush, so whatever is on
/// disk decodes even if lbd dies before the segment's trailer: a segment
/// cut short replays the lines before the cut; a corrupt one is skipped.
mod spool {
    use std::{
        collections::VecDeque,
        fs::{self, File, OpenOptions},
        io::{self, Read, Write},
        path::{Path, PathBuf},
    };

    use flate2::{Compression, read::GzDecoder, write::GzEncoder};

    /// What finishing a segment may add after its last chunk (the final
    /// deflate block, 2 bytes after a sync flush, and the 8-byte gzip
    /// trailer), held back so that sealing never passes the bound.
    const FINISH_RESERVE: u64 = 16;

    /// The unit dropped at the bound and resent after a failed replay.
    const MAX_SEGMENT_BYTES: u64 = 1 << 20;

    /// Uncompressed input per chunk (one write, one sync flush).
    const MAX_CHUNK_INPUT: u64 = 64 << 10;

    /// Replayed text per write to carbon.
    const REPLAY_PIECE: usize = 256 << 10;

    #[derive(Debug, thiserror::Error)]
    enum SpoolError {
        #[error("{}: {source}", path.display())]
        Io { path: PathBuf, source: io::Error },
        #[error("{need} bytes of lines do not fit spool_max_bytes {max}")]
        NoRoom { need: u64, max: u64 },
    }

    fn at(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
        move |source| SpoolError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(super) enum Replayed {
        /// Nothing was spooled.
        Empty,
        /// The oldest segment went to carbon (or was skipped as corrupt).
        Sent,
        /// Carbon did not take it; it stays, whole, for the next try.
        Failed,
    }

    struct Segment {
        path: PathBuf,
        bytes: u64,
        lines: u64,
    }

    /// The segment being written: its file and the gzip stream that goes
    /// into it a chunk at a time.
    struct Open {
        seg: Segment,
        file: File,
        gz: GzEncoder<Vec<u8>>,
    }

    impl Open {
        fn compress(&mut self, lines: &[String]) -> io::Result<Vec<u8>> {
            for l in lines {
                self.gz.write_all(l.as_bytes())?;
                self.gz.write_all(b"\n")?;
            }
            // A sync flush: everything so far decodes from what is on disk.
            self.gz.flush()?;
            Ok(std::mem::take(self.gz.get_mut()))
        }

        /// Writes the gzip trailer; returns the bytes added.
        fn finish(&mut self) -> io::Result<u64> {
            self.gz.try_finish()?;
            let tail = std::mem::take(self.gz.get_mut());
            self.file.write_all(&tail)?;
            Ok(tail.len() as u64)
        }
    }

    pub(super) struct Spool {
        dir: PathBuf,
        max_bytes: u64,
        /// A segment this large is finished and the next one begun.
        segment_bytes: u64,
        chunk_input: u64,
        /// Finished (or given up on), oldest first; all older than `open`.
        segments: VecDeque<Segment>,
        open: Option<Open>,
        next_seq: u64,
        bytes: u64,
        lines: u64,
        /// Since the last [`Spool::take_dropped`].
        dropped: u64,
        /// Whether the last write failed: a full disk warns once, not at
        /// every push.
        failing: bool,
    }

    impl Spool {
        /// The spool in `dir`, with what an earlier lbd left there.
        pub(super) fn open(dir: PathBuf, max_bytes: u64) -> Spool {
            // An open segment stays under an eighth of the bound and a
            // chunk under a quarter, so dropping every finished segment
            // always makes room for the next chunk.
            let mut s = Spool {
                dir,
                max_bytes,
                segment_bytes: (max_bytes / 8).min(MAX_SEGMENT_BYTES),
                chunk_input: (max_bytes / 4).min(MAX_CHUNK_INPUT),
                segments: VecDeque::new(),
                open: None,
                next_seq: 0,
                bytes: 0,
                lines: 0,
                dropped: 0,
                failing: false,
            };
            s.adopt();
            s
        }

        pub(super) fn lines(&self) -> u64 {
            self.lines
        }

        pub(super) fn bytes(&self) -> u64 {
            self.bytes
        }

        pub(super) fn take_dropped(&mut self) -> u64 {
            std::mem::take(&mut self.dropped)
        }

        /// Appends `lines` after everything spooled so far.
        pub(super) fn append(&mut self, lines: &[String]) {
            for chunk in chunks(lines, self.chunk_input) {
                match self.write_chunk(chunk) {
                    Ok(()) => self.failing = false,
                    Err(e) => self.lose(chunk.len(), &e),
                }
            }
        }

        /// lbd is exiting: the segment being written gets its trailer.
        pub(super) fn close(&mut self) {
            self.seal();
        }

        /// Sends the oldest segment's lines through `send`, oldest first,
        /// and removes it once all of it went. A failed send keeps it
        /// whole, to be sent again (carbon takes a repeated line as the
        /// same point).
        pub(super) fn replay_oldest(&mut self, send: &mut dyn FnMut(&[u8]) -> bool) -> Replayed {
            if self.segments.is_empty() {
                self.seal();
            }
            let Some(seg) = self.segments.front() else {
                return Replayed::Empty;
            };
            let mut sent = 0u64;
            let read = read_segment(&seg.path, REPLAY_PIECE, &mut |text| {
                let ok = send(text);
                if ok {
                    sent += newlines(text);
                }
                ok
            });
            match read {
                Ok(End::Stopped) => return Replayed::Failed,
                Ok(End::Whole | End::Truncated) => {}
                Err(e) => {
                    tracing::warn!(segment = %seg.path.display(), error = %e, "corrupt Graphite spool segment skipped");
                    self.dropped += seg.lines.saturating_sub(sent);
                }
            }
            self.remove_oldest();
            Replayed::Sent
        }

        /// Takes the segments in `dir`, oldest first: counts their lines,
        /// skips corrupt ones, and holds the bound (it may have shrunk).
        fn adopt(&mut self) {
            let entries = match fs::read_dir(&self.dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the Graphite spool; starting a new one");
                    return;
                }
            };
            let mut found: Vec<(u64, PathBuf)> = entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let path = e.path();
                    seq_of(&path).map(|seq| (seq, path))
                })
                .collect();
            found.sort();
            for (seq, path) in found {
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                self.adopt_segment(path);
            }
            while self.bytes > self.max_bytes && !self.segments.is_empty() {
                self.drop_oldest();
            }
            if self.segments.is_empty() {
                let _ = fs::remove_dir(&self.dir);
            }
            if self.lines > 0 {
                tracing::info!(lines = self.lines, bytes = self.bytes, dir = %self.dir.display(), "Graphite spool left by an earlier lbd; replayed when carbon answers");
            }
        }

        fn adopt_segment(&mut self, path: PathBuf) {
            let mut lines = 0u64;
            let read = read_segment(&path, REPLAY_PIECE, &mut |text| {
                lines += newlines(text);
                true
            });
            match read {
                Ok(End::Truncated) => {
                    tracing::warn!(segment = %path.display(), lines, "Graphite spool segment cut short (lbd stopped while writing it?); replaying the lines before the cut");
                }
                Ok(End::Whole | End::Stopped) => {}
                Err(e) => {
                    tracing::warn!(segment = %path.display(), error = %e, "corrupt Graphite spool segment skipped");
                    self.dropped += lines;
                    remove(&path);
                    return;
                }
            }
            if lines == 0 {
                remove(&path);
                return;
            }
            let bytes = fs::metadata(&path).map_or(0, |m| m.len());
            self.bytes += bytes;
            self.lines += lines;
            self.segments.push_back(Segment { path, bytes, lines });
        }

        fn write_chunk(&mut self, lines: &[String]) -> Result<(), SpoolError> {
            if self
                .open
                .as_ref()
                .is_some_and(|o| o.seg.bytes >= self.segment_bytes)
            {
                self.seal();
            }
            let mut open = match self.open.take() {
                Some(open) => open,
                None => self.begin_segment()?,
            };
            match self.write_into(&mut open, lines) {
                Ok(()) => {
                    self.open = Some(open);
                    Ok(())
                }
                Err(e) => {
                    // Its gzip stream has the chunk now: nothing can follow
                    // in that file.
                    self.give_up(open);
                    Err(e)
                }
            }
        }

        fn write_into(&mut self, open: &mut Open, lines: &[String]) -> Result<(), SpoolError> {
            let data = open.compress(lines).map_err(at(&open.seg.path))?;
            let need = data.len() as u64 + FINISH_RESERVE;
            if !self.make_room(need) {
                return Err(SpoolError::NoRoom {
                    need,
                    max: self.max_bytes,
                });
            }
            if let Err(e) = open.file.write_all(&data) {
                // What did get written would replay lines counted as lost.
                let _ = open.file.set_len(open.seg.bytes);
                return Err(at(&open.seg.path)(e));
            }
            let n = data.len() as u64;
            open.seg.bytes += n;
            open.seg.lines += lines.len() as u64;
            self.bytes += n;
            self.lines += lines.len() as u64;
            Ok(())
        }

        fn begin_segment(&mut self) -> Result<Open, SpoolError> {
            fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
            let path = self.dir.join(format!("{:020}.gz", self.next_seq));
            self.next_seq += 1;
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(at(&path))?;
            Ok(Open {
                seg: Segment {
                    path,
                    bytes: 0,
                    lines: 0,
                },
                file,
                gz: GzEncoder::new(Vec::new(), Compression::default()),
            })
        }

        /// Lines that could not be kept: counted.
        fn lose(&mut self, lines: usize, e: &SpoolError) {
            if !self.failing {
                tracing::warn!(error = %e, lines, "Graphite spool write failed; lines dropped");
            }
            self.failing = true;
            self.dropped += lines as u64;
        }

        /// Finishes the segment being written, so that it reads back whole.
        fn seal(&mut self) {
            let Some(mut open) = self.open.take() else {
                return;
            };
            match open.finish() {
                Ok(n) => {
                    open.seg.bytes += n;
                    self.bytes += n;
                    self.segments.push_back(open.seg);
                }
                Err(e) => {
                    tracing::warn!(segment = %open.seg.path.display(), error = %e, "cannot finish a Graphite spool segment");
                    self.give_up(open);
                }
            }
        }

        /// Keeps a segment that cannot be written to any more as it is on
        /// disk, where it reads as cut short after its last whole chunk.
        fn give_up(&mut self, open: Open) {
            let Open { mut seg, .. } = open;
            let on_disk = fs::metadata(&seg.path).map_or(seg.bytes, |m| m.len());
            self.bytes = self.bytes - seg.bytes + on_disk;
            seg.bytes = on_disk;
            if seg.lines == 0 {
                remove(&seg.path);
                self.bytes -= seg.bytes;
            } else {
                self.segments.push_back(seg);
            }
        }

        /// Drops the oldest finished segments until `need` more bytes fit.
        fn make_room(&mut self, need: u64) -> bool {
            while self.bytes + need > self.max_bytes {
                if self.segments.is_empty() {
                    return false;
                }
                self.drop_oldest();
            }
            true
        }

        fn drop_oldest(&mut self) {
            let Some(seg) = self.segments.front() else {
                return;
            };
            tracing::warn!(segment = %seg.path.display(), lines = seg.lines, "Graphite spool at spool_max_bytes: its oldest segment dropped");
            self.dropped += seg.lines;
            self.remove_oldest();
        }

        fn remove_oldest(&mut self) {
            let Some(seg) = self.segments.pop_front() else {
                return;
            };
            remove(&seg.path);
            self.bytes -= seg.bytes;
            self.lines -= seg.lines;
            if self.segments.is_empty() && self.open.is_none() {
                // Nothing left behind for an operator to wonder about.
                let _ = fs::remove_dir(&self.dir);
            }
        }
    }

    fn remove(path: &Path) {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(segment = %path.display(), error = %e, "cannot remove a Graphite spool segment")
            }
            _ => {}
        }
    }

    /// `00000000000000000042.gz` -> 42.
    fn seq_of(path: &Path) -> Option<u64> {
        let name = path.file_name()?.to_str()?;
        let digits = name.strip_suffix(".gz")?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    fn newlines(text: &[u8]) -> u64 {
        text.iter().filter(|&&b| b == b'\n').count() as u64
    }

    /// Consecutive runs of `lines` of at most `max` bytes (at least one
    /// line each).
    fn chunks(lines: &[String], max: u64) -> impl Iterator<Item = &[String]> {
        let mut rest = lines;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let mut size = 0u64;
            let n = rest
                .iter()
                .take_while(|l| {
                    size += l.len() as u64 + 1;
                    size <= max
                })
                .count()
                .max(1);
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Some(head)
        })
    }

    /// How reading a segment ended.
    enum End {
        Whole,
        /// Cut short: the lines before the cut were read.
        Truncated,
        /// The consumer said stop.
        Stopped,
    }

    /// Feeds `f` a segment's complete lines in order, in pieces of about
    /// `piece` bytes; an error is a segment that is not gzip or not intact
    /// (a cut is not an error: see [`End::Truncated`]).
    fn read_segment(
        path: &Path,
        piece: usize,
        f: &mut dyn FnMut(&[u8]) -> bool,
    ) -> io::Result<End> {
        let mut gz = GzDecoder::new(File::open(path)?);
        let mut buf: Vec<u8> = Vec::with_capacity(piece + (64 << 10));
        let end = loop {
            let len = buf.len();
            buf.resize(len + (64 << 10), 0);
            let got = gz.read(&mut buf[len..]);
            buf.truncate(len + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => break End::Whole,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break End::Truncated,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if buf.len() >= piece && !emit_lines(&mut buf, f) {
                return Ok(End::Stopped);
            }
        };
        // Without its newline a last line was cut: dropped.
        if !emit_lines(&mut buf, f) {
            return Ok(End::Stopped);
        }
        Ok(end)
    }

    /// Hands `f` the complete lines at the front of `buf`.
    fn emit_lines(buf: &mut Vec<u8>, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        let Some(last) = buf.iter().rposition(|&b| b == b'\n') else {
            return true;
        };
        let ok = f(&buf[..=last]);
        buf.drain(..=last);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackendState;
    use crate::metrics::BackendTraffic;

    #[test]
    fn paths_and_values() {
        let snap = vec![VipTraffic {
            vip: "198.18.100.1:80/tcp".into(),
            packets: 10,
            bytes: 1000,
            new_flows: 2,
            backends: vec![BackendTraffic {
                backend: "fd00:198:18::20".into(),
                state: BackendState::Draining,
                up: true,
                weight: 100,
                packets: 10,
                bytes: 1000,
                new_flows: 2,
            }],
        }];
        let l = lines("lb", &snap, 1700000000);
        assert!(l.contains(&"lb.198_18_100_1_80_tcp.all.packets 10 1700000000".to_owned()));
        // `up` is the health checks' verdict, as lb_backend_up: a drained
        // backend whose checks pass is up.
        assert!(l.contains(&"lb.198_18_100_1_80_tcp.fd00_198_18__20.up 1 1700000000".to_owned()));
        assert_eq!(l.len(), 3 + 5);
    }

    // ---- the spool ----

    /// A directory of this test's own, empty, removed when dropped.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("lb-graphite-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    /// Lines whose value and timestamp are their number: order shows.
    fn numbered(range: std::ops::Range<u64>) -> Vec<String> {
        range.map(|i| format!("t.m {i} {i}")).collect()
    }

    fn append_in_batches(spool: &mut Spool, range: std::ops::Range<u64>, batch: usize) {
        for b in numbered(range).chunks(batch) {
            spool.append(b);
        }
    }

    /// Everything the spool replays, in order.
    fn replay_all(spool: &mut Spool) -> Vec<String> {
        let mut out = String::new();
        loop {
            let r = spool.replay_oldest(&mut |text| {
                out.push_str(std::str::from_utf8(text).expect("lines are text"));
                true
            });
            if let Replayed::Empty = r {
                break;
            }
        }
        out.lines().map(str::to_owned).collect()
    }

    /// The segments on disk and their total size.
    fn on_disk(dir: &Path) -> (usize, u64) {
        std::fs::read_dir(dir).map_or((0, 0), |entries| {
            entries.filter_map(Result::ok).fold((0, 0), |(n, b), e| {
                (n + 1, b + e.metadata().map_or(0, |m| m.len()))
            })
        })
    }

    #[test]
    fn spool_replays_in_order_across_segments() {
        let dir = scratch("order");
        let mut spool = Spool::open(dir.clone(), 128 << 10);
        append_in_batches(&mut spool, 0..20_000, 100);
        let (segments, bytes) = on_disk(&dir);
        assert!(segments > 2, "{segments} segments");
        assert_eq!((spool.lines(), spool.bytes()), (20_000, bytes));
        assert_eq!(replay_all(&mut spool), numbered(0..20_000));
        assert_eq!(
            (spool.lines(), spool.bytes(), spool.take_dropped()),
            (0, 0, 0)
        );
        assert!(!dir.exists(), "a replayed spool leaves nothing behind");
    }

    #[test]
    fn spool_holds_its_bound_dropping_the_oldest() {
        let dir = scratch("bound");
        let mut spool = Spool::open(dir.clone(), 4096);
        for b in numbered(0..5_000).chunks(13) {
            spool.append(b);
            let (_, bytes) = on_disk(&dir);
            assert!(bytes <= 4096, "{bytes} bytes on disk");
            assert_eq!(spool.bytes(), bytes);
        }
        let dropped = spool.take_dropped();
        assert!(dropped > 0);
        spool.close();
        assert!(on_disk(&dir).1 <= 4096, "sealing stays within the bound");
        let kept = replay_all(&mut spool);
        assert_eq!(
            dropped + kept.len() as u64,
            5_000,
            "every line kept or counted"
        );
        assert_eq!(kept, numbered(dropped..5_000), "the oldest went first");
    }

    #[test]
    fn spool_is_replayed_by_the_next_lbd() {
        let dir = scratch("restart");
        let mut spool = Spool::open(dir.clone(), 64 << 10);
        append_in_batches(&mut spool, 0..3_000, 100);
        spool.close();
        let mut next = Spool::open(dir.clone(), 64 << 10);
        assert_eq!(next.lines(), 3_000);
        append_in_batches(&mut next, 3_000..4_000, 100);
        assert_eq!(replay_all(&mut next), numbered(0..4_000));
    }

    #[test]
    fn a_segment_cut_short_replays_the_lines_before_the_cut() {
        let dir = scratch("cut");
        let mut spool = Spool::open(dir.clone(), 1 << 20);
        append_in_batches(&mut spool, 0..1_000, 10);
        // lbd killed: no trailer; then the disk lost the end of the file.
        drop(spool);
        let seg = dir.join(format!("{:020}.gz", 0));
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let mut next = Spool::open(dir.clone(), 1 << 20);
        let n = next.lines();
        assert!(n > 0 && n < 1_000, "{n} lines before the cut");
        assert_eq!(replay_all(&mut next), numbered(0..n));
    }

    #[test]
    fn an_unfinished_segment_replays_whole() {
        let dir = scratch("unfinished");
        let mut spool = Spool::open(dir.clone(), 1 << 20);
        append_in_batches(&mut spool, 0..1_000, 10);
        drop(spool);
        let mut next = Spool::open(dir.clone(), 1 << 20);
        assert_eq!(replay_all(&mut next), numbered(0..1_000));
    }

    #[test]
    fn a_corrupt_segment_is_skipped() {
        let dir = scratch("corrupt");
        let mut spool = Spool::open(dir.clone(), 1 << 20);
        append_in_batches(&mut spool, 0..1_000, 10);
        spool.close();
        let mut spool = Spool::open(dir.clone(), 1 << 20);
        append_in_batches(&mut spool, 1_000..2_000, 10);
        spool.close();
        let first = dir.join(format!("{:020}.gz", 0));
        let mut bytes = std::fs::read(&first).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid..mid + 8].fill(0xa5);
        std::fs::write(&first, bytes).unwrap();
        std::fs::write(dir.join(format!("{:020}.gz", 7)), b"not gzip at all").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a segment").unwrap();

        let mut next = Spool::open(dir.clone(), 1 << 20);
        assert_eq!(replay_all(&mut next), numbered(1_000..2_000));
        assert!(!first.exists());
        assert!(dir.join("notes.txt").exists(), "only segments are touched");
    }

    #[test]
    fn a_failed_write_drops_and_counts() {
        let dir = scratch("full");
        std::fs::write(&*dir, b"a file where the spool directory should be").unwrap();
        let mut spool = Spool::open(dir.join("spool"), 1 << 20);
        append_in_batches(&mut spool, 0..100, 10);
        assert_eq!((spool.lines(), spool.take_dropped()), (0, 100));
    }

    #[test]
    fn a_line_larger_than_the_bound_is_dropped() {
        let dir = scratch("huge");
        let mut spool = Spool::open(dir.clone(), 4096);
        // Incompressible: 20 KiB of pseudo-random hex.
        let mut x = 1u64;
        let noise: String = (0..2560)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("{:08x}", x >> 32)
            })
            .collect();
        spool.append(&[format!("t.m {noise} 1")]);
        assert_eq!((spool.lines(), spool.take_dropped()), (0, 1));
        assert!(on_disk(&dir).0 == 0, "nothing left of it");
        append_in_batches(&mut spool, 0..10, 5);
        assert_eq!(replay_all(&mut spool), numbered(0..10));
    }

    #[test]
    fn a_smaller_bound_is_held_at_start() {
        let dir = scratch("shrunk");
        let mut spool = Spool::open(dir.clone(), 1 << 20);
        append_in_batches(&mut spool, 0..50_000, 500);
        spool.close();
        let mut next = Spool::open(dir.clone(), 16 << 10);
        assert!(on_disk(&dir).1 <= 16 << 10);
        let dropped = next.take_dropped();
        assert_eq!(replay_all(&mut next), numbered(dropped..50_000));
    }

    #[test]
    fn spool_dir_is_named_after_the_state_file() {
        assert_eq!(
            spool_dir(Path::new("/var/lib/lb/lb0.state.json")),
            Path::new("/var/lib/lb/lb0.state.json.graphite-spool")
        );
    }

    // ---- the pusher, against a stand-in for carbon ----

    fn config(address: SocketAddr, max_buffered_lines: usize) -> GraphiteConfig {
        GraphiteConfig {
            address,
            prefix: "t".into(),
            interval: Duration::from_secs(1),
            max_buffered_lines,
            spool_max_bytes: 1 << 20,
        }
    }

    /// An address nothing listens on (until the test binds it again).
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Accepts the pusher's connection and reads `n` lines from it.
    fn receive(listener: &std::net::TcpListener, n: usize) -> (TcpStream, Vec<String>) {
        use std::io::BufRead;
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut lines = Vec::new();
        let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
        while lines.len() < n {
            let mut l = String::new();
            assert!(r.read_line(&mut l).unwrap() > 0, "carbon's peer closed");
            lines.push(l.trim_end().to_owned());
        }
        (conn, lines)
    }

    #[test]
    fn lines_wait_for_carbon_in_order() {
        let address = closed_port();
        let dir = scratch("wait");
        let pusher = Pusher::start(config(address, 10), Some(dir.to_path_buf()));
        for b in numbered(0..100).chunks(5) {
            pusher.offer(b.to_vec());
            // One interval apart, as lbd offers them.
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_until("all lines taken", || {
            let s = pusher.stats();
            s.spooled_lines + s.buffered_lines == 100
        });
        assert_eq!(pusher.stats().buffered_lines, 10);

        let carbon = std::net::TcpListener::bind(address).unwrap();
        pusher.offer(numbered(100..105));
        let (_conn, got) = receive(&carbon, 105);
        assert_eq!(got, numbered(0..105));
        // Nothing dropped, nothing left.
        wait_until("all sent", || pusher.stats() == PushStats::default());
    }

    #[test]
    fn a_connection_carbon_closed_is_not_written_into() {
        let carbon = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = carbon.local_addr().unwrap();
        let dir = scratch("closed");
        let pusher = Pusher::start(config(address, 100), Some(dir.to_path_buf()));
        pusher.offer(numbered(0..5));
        let (conn, got) = receive(&carbon, 5);
        assert_eq!(got, numbered(0..5));

        // Carbon goes away between two pushes.
        drop((conn, carbon));
        std::thread::sleep(Duration::from_millis(50));
        pusher.offer(numbered(5..10));
        pusher.offer(numbered(10..15));
        wait_until("lines kept", || pusher.stats().buffered_lines == 10);

        let carbon = std::net::TcpListener::bind(address).unwrap();
        pusher.offer(numbered(15..20));
        let (_conn, got) = receive(&carbon, 15);
        assert_eq!(got, numbered(5..20));
    }

    #[test]
    fn exit_spools_what_memory_holds() {
        let dir = scratch("exit");
        let pusher = Pusher::start(config(closed_port(), 1_000), Some(dir.to_path_buf()));
        for b in numbered(0..30).chunks(10) {
            pusher.offer(b.to_vec());
        }
        wait_until("lines buffered", || pusher.stats().buffered_lines == 30);
        drop(pusher);
        let mut next = Spool::open(dir.to_path_buf(), 1 << 20);
        assert_eq!(replay_all(&mut next), numbered(0..30));
    }

    #[test]
    fn without_a_spool_overflow_is_counted() {
        let pusher = Pusher::spawn(config(closed_port(), 10));
        for b in numbered(0..30).chunks(10) {
            pusher.offer(b.to_vec());
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_until("overflow counted", || pusher.stats().dropped_lines == 20);
        assert_eq!(pusher.stats().buffered_lines, 10);
    }
}
