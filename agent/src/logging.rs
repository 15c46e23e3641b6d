//! Logging for the agent and the CLI: text (or JSON) on stdout, with a level filter that the
//! admin API can change while the agent runs (`POST /logging?level=debug`).
//!
//! The agent writes an access line for every connection and an audit line for every
//! authorization decision: a `write` system call each was a tenth of a new connection's system
//! calls. Its lines are gathered in memory and written in batches (`Batched`): at least every
//! 100 ms, at once for a warning or an error, and at exit.
use std::{
    io::Write,
    sync::{Condvar, Mutex, OnceLock},
    time::Duration,
};

use tracing_subscriber::{
    fmt::{writer::EitherWriter, MakeWriter},
    layer::SubscriberExt,
    reload,
    util::SubscriberInitExt,
    EnvFilter, Layer, Registry,
};

/// Log line format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// How long a line may wait in a batch.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// A batch this large is written at once.
const BATCH_BYTES: usize = 32 * 1024;

/// Log lines gathered for `target`, written in batches (see the module docs). Each event is
/// appended whole under one lock, so lines keep their order and never interleave.
pub struct Batched<W: Write> {
    inner: Mutex<(Vec<u8>, W)>,
    /// Signalled when a batch starts, so the flusher sleeps while there is nothing to write.
    started: Condvar,
}

impl<W: Write> Batched<W> {
    pub fn new(target: W) -> Self {
        Self {
            inner: Mutex::new((Vec::with_capacity(BATCH_BYTES), target)),
            started: Condvar::new(),
        }
    }

    fn append(&self, line: &[u8], urgent: bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = inner.0.is_empty();
        inner.0.extend_from_slice(line);
        if urgent || inner.0.len() >= BATCH_BYTES {
            write_out(&mut inner);
        } else if was_empty {
            self.started.notify_one();
        }
    }

    /// Waits until there is something to write, then until it is `BATCH_INTERVAL` old, and
    /// writes it: the flusher thread's loop.
    fn flush_when_due(&self) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = self
            .started
            .wait_while(inner, |(batch, _)| batch.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        drop(inner);
        std::thread::sleep(BATCH_INTERVAL);
        self.flush();
    }

    /// Writes what has gathered.
    pub fn flush(&self) {
        write_out(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

fn write_out<W: Write>(inner: &mut (Vec<u8>, W)) {
    let (batch, target) = inner;
    if !batch.is_empty() {
        // Nowhere to report a failure to write the log; the lines are dropped, not retried
        // (a full disk must not grow the agent's memory).
        let _ = target.write_all(batch).and_then(|()| target.flush());
        batch.clear();
    }
}

/// One event's writer: the formatter writes the whole line, then drops it.
pub struct BatchedLine<'a, W: Write> {
    sink: &'a Batched<W>,
    line: Vec<u8>,
    urgent: bool,
}

impl<W: Write> Write for BatchedLine<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for BatchedLine<'_, W> {
    fn drop(&mut self) {
        self.sink.append(&self.line, self.urgent);
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for Batched<W> {
    type Writer = BatchedLine<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        BatchedLine {
            sink: self,
            line: Vec::new(),
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        BatchedLine {
            sink: self,
            line: Vec::new(),
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

static STDOUT: OnceLock<Batched<std::io::Stdout>> = OnceLock::new();

/// Stdout as the subscriber writes it: batched (the agent) or at once (the CLI).
#[derive(Clone, Copy)]
struct Stdout(Option<&'static Batched<std::io::Stdout>>);

impl<'a> MakeWriter<'a> for Stdout {
    type Writer = EitherWriter<BatchedLine<'static, std::io::Stdout>, std::io::Stdout>;

    fn make_writer(&'a self) -> Self::Writer {
        match self.0 {
            Some(sink) => EitherWriter::A(sink.make_writer()),
            None => EitherWriter::B(std::io::stdout()),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        match self.0 {
            Some(sink) => EitherWriter::A(sink.make_writer_for(meta)),
            None => EitherWriter::B(std::io::stdout()),
        }
    }
}

/// The agent's batched stdout; the first call starts its flusher thread and makes a panic
/// write what gathered before its report.
fn batched_stdout() -> &'static Batched<std::io::Stdout> {
    let mut first = false;
    let sink = STDOUT.get_or_init(|| {
        first = true;
        Batched::new(std::io::stdout())
    });
    if first {
        // A panic's last lines are the ones most wanted.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            flush();
            report(info);
        }));
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || loop {
                sink.flush_when_due();
            });
    }
    sink
}

/// Writes the batched lines now (the agent calls it on its way out).
pub fn flush() {
    if let Some(sink) = STDOUT.get() {
        sink.flush();
    }
}

/// Installs the global subscriber. The filter comes from `RUST_LOG`, else `info`. With
/// `batched` (the agent), lines are written in batches; without (the CLI), at once.
pub fn init(format: LogFormat, batched: bool) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: log files and collectors get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(Stdout(batched.then(batched_stdout)));
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => Box::new(fmt),
        LogFormat::Json => Box::new(fmt.json()),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the level filter (same syntax as `RUST_LOG`, e.g. `debug` or `info,access=debug`).
pub fn set_filter(spec: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(spec).map_err(|e| {
        format!("{spec:?} is not a log filter (e.g. `debug`, `info,audit=debug`): {e}")
    })?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging was not initialised with a reloadable filter".to_string())?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    tracing::info!(target: "audit", event = "log_level_changed", filter = %spec, "log filter changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose writes the test can read.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(target: &Shared) -> String {
        String::from_utf8(target.0.lock().expect("lock").clone()).expect("utf-8")
    }

    #[test]
    fn lines_wait_for_the_batch_but_warnings_and_errors_go_at_once_in_order() {
        let target = Shared::default();
        let sink = Batched::new(target.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "access", "first connection closed");
            tracing::info!(target: "access", "second connection closed");
            assert_eq!(text(&target), "", "info lines wait for the batch");
            tracing::warn!("a refusal");
            let out = text(&target);
            let (first, second, warning) = (
                out.find("first connection")
                    .expect("first line written with the warning"),
                out.find("second connection").expect("second line"),
                out.find("a refusal").expect("the warning"),
            );
            assert!(first < second && second < warning, "in order: {out}");
            tracing::info!("after");
        });
        assert!(!text(&target).contains("after"));
    }

    #[test]
    fn the_flusher_writes_a_batch_once_it_is_due() {
        let target = Shared::default();
        let sink = std::sync::Arc::new(Batched::new(target.clone()));
        let flusher = sink.clone();
        let done = std::thread::spawn(move || flusher.flush_when_due());
        std::thread::sleep(BATCH_INTERVAL / 2);
        sink.append(b"late\n", false);
        done.join().expect("flusher");
        assert_eq!(text(&target), "late\n");
    }

    #[test]
    fn flush_writes_what_gathered_and_a_full_batch_goes_by_itself() {
        let target = Shared::default();
        let sink = Batched::new(target.clone());
        sink.append(b"one\n", false);
        assert_eq!(text(&target), "");
        sink.flush();
        assert_eq!(text(&target), "one\n");
        let long = vec![b'x'; BATCH_BYTES];
        sink.append(&long, false);
        assert_eq!(
            text(&target).len(),
            4 + BATCH_BYTES,
            "a full batch is written"
        );
    }
}
