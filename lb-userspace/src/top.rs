//! `lbctl top`: a live view of traffic per VIP and backend, refreshed every
//! second from lbd's `/v1/stats`.

use std::{
    io,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use crossterm::{
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    layout::Constraint,
    style::{Modifier, Style},
    widgets::{Block, Borders, Cell, Row, Table},
};

use crate::{api::BackendState, metrics::VipTraffic};

#[derive(Clone, Copy, PartialEq, Eq)]
enum SortBy {
    Name,
    Pps,
    Bps,
    Flows,
}

struct Line {
    vip: String,
    backend: String,
    state: String,
    pps: f64,
    bps: f64,
    flows: f64,
    packets: u64,
}

fn lines(prev: &[VipTraffic], cur: &[VipTraffic], secs: f64) -> Vec<Line> {
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs.max(1e-3);
    let mut out = Vec::new();
    for v in cur {
        let pv = prev.iter().find(|p| p.vip == v.vip);
        for b in &v.backends {
            let pb = pv.and_then(|p| p.backends.iter().find(|x| x.backend == b.backend));
            let (p0, b0, f0) = pb.map_or((b.packets, b.bytes, b.new_flows), |x| {
                (x.packets, x.bytes, x.new_flows)
            });
            out.push(Line {
                vip: v.vip.clone(),
                backend: b.backend.clone(),
                state: match b.state {
                    BackendState::Up => "up",
                    BackendState::Down => "DOWN",
                    BackendState::Draining => "draining",
                }
                .into(),
                pps: rate(p0, b.packets),
                bps: 8.0 * rate(b0, b.bytes),
                flows: rate(f0, b.new_flows),
                packets: b.packets,
            });
        }
    }
    out
}

/// Restores the terminal however `top` ends.
struct Screen;

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen);
    }
}

/// Runs until the operator quits. `first` is a sample the caller took
/// before the terminal is taken over, so that an absent lbd is reported
/// (with its own exit code) on a normal screen; `fetch` takes the next ones,
/// and its errors are shown in the title while the view keeps running.
pub fn run(
    first: Vec<VipTraffic>,
    mut fetch: impl FnMut() -> Result<Vec<VipTraffic>>,
) -> Result<()> {
    let mut prev = first;
    let mut prev_at = Instant::now();
    enable_raw_mode()
        .context("the terminal does not support raw mode (run lbctl top in a terminal)")?;
    let _screen = Screen;
    execute!(io::stdout(), EnterAlternateScreen)?;
    let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    let mut sort = SortBy::Pps;
    let mut rows: Vec<Line> = lines(&prev, &prev, 1.0);
    let mut error = String::new();
    loop {
        rows.sort_by(|a, b| match sort {
            SortBy::Name => (&a.vip, &a.backend).cmp(&(&b.vip, &b.backend)),
            SortBy::Pps => b.pps.total_cmp(&a.pps),
            SortBy::Bps => b.bps.total_cmp(&a.bps),
            SortBy::Flows => b.flows.total_cmp(&a.flows),
        });
        term.draw(|f| draw(f, &rows, &error))?;
        // Keys are handled at once; data refreshes every second.
        let deadline = prev_at + Duration::from_secs(1);
        while Instant::now() < deadline {
            let wait = deadline.saturating_duration_since(Instant::now());
            if event::poll(wait)?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    KeyCode::Char('p') => sort = SortBy::Pps,
                    KeyCode::Char('b') => sort = SortBy::Bps,
                    KeyCode::Char('f') => sort = SortBy::Flows,
                    KeyCode::Char('n') => sort = SortBy::Name,
                    _ => {}
                }
                break;
            }
        }
        if Instant::now() >= deadline {
            match fetch() {
                Ok(cur) => {
                    let secs = prev_at.elapsed().as_secs_f64();
                    rows = lines(&prev, &cur, secs);
                    prev = cur;
                    prev_at = Instant::now();
                    error.clear();
                }
                Err(e) => {
                    error = format!("{e:#}");
                    prev_at = Instant::now();
                }
            }
        }
    }
}

/// One frame: the header, a row per VIP and backend, the title with the
/// keys and the last fetch error.
fn draw(f: &mut ratatui::Frame, rows: &[Line], error: &str) {
    let header = Row::new([
        "VIP", "backend", "state", "pkts/s", "bits/s", "flows/s", "packets",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|l| {
        Row::new(vec![
            Cell::from(l.vip.clone()),
            Cell::from(l.backend.clone()),
            Cell::from(l.state.clone()),
            Cell::from(format!("{:.1}", l.pps)),
            Cell::from(format!("{:.0}", l.bps)),
            Cell::from(format!("{:.1}", l.flows)),
            Cell::from(l.packets.to_string()),
        ])
    });
    let title = format!(
        " lbctl top  [sort: p pkts/s, b bits/s, f flows/s, n name]  q quits {}",
        if error.is_empty() {
            String::new()
        } else {
            format!(" | {error}")
        }
    );
    let widths = [
        Constraint::Length(30),
        Constraint::Length(28),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(9),
        Constraint::Length(12),
    ];
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(title));
    f.render_widget(table, f.area());
}
