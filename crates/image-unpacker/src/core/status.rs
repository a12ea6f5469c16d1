//! What the unpacker reports: GetStatus, the HTTP status page's JSON, and
//! the protobuf views of a stream and a device. Read-only, apart from
//! dropping capture holds that ran out.

use fleet_proto::{
    unpacker::{Device, Status as UnpackerStatus, StreamStatus},
    unpacker_view::StatusView,
};

use super::Unpacker;
use crate::state::{DeviceRecord, State, now_unix};

impl Unpacker {
    pub(super) fn stream_status(state: &State, name: &str) -> StreamStatus {
        let Some(s) = state.streams.get(name) else {
            return StreamStatus { stream: name.to_owned(), ..Default::default() };
        };
        StreamStatus {
            stream: name.to_owned(),
            volume_id: s.volume_id.clone(),
            device_path: state.devices.get(&s.volume_id).map(|d| d.path.display().to_string()).unwrap_or_default(),
            state: s.phase.proto().into(),
            leaf: s.leaf.clone().unwrap_or_default(),
            image_id: s.image_id.clone().unwrap_or_default(),
            image_size: s.image_size,
            // Filled in by `status`, which sees the holds.
            hold_seconds: 0,
            hold_leaf: String::new(),
        }
    }

    pub(super) fn device_proto(state: &State, volume_id: &str, d: &DeviceRecord) -> Device {
        Device {
            volume_id: volume_id.to_owned(),
            path: d.path.display().to_string(),
            size_bytes: d.size,
            kind: d.kind.as_str().to_owned(),
            stream: state.stream_of(volume_id).unwrap_or_default().to_owned(),
        }
    }

    /// Devices, streams and idle time.
    pub fn status(&self) -> UnpackerStatus {
        let mut state = self.state();
        let names: Vec<String> = state.streams.keys().cloned().collect();
        let streams: Vec<StreamStatus> = names
            .iter()
            .map(|s| {
                let (left, leaf) = Self::holds_left(&mut state, s).unwrap_or_default();
                let secs = if left.is_zero() { 0 } else { u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX) };
                StreamStatus { hold_seconds: secs, hold_leaf: leaf, ..Self::stream_status(&state, s) }
            })
            .collect();
        let held = streams.iter().any(|s| s.hold_seconds > 0);
        let busy = held || !self.0.busy.lock().expect("busy lock").is_empty();
        UnpackerStatus {
            devices: state.devices.iter().map(|(v, d)| Self::device_proto(&state, v, d)).collect(),
            streams,
            idle_seconds: if busy { 0 } else { now_unix().saturating_sub(state.last_used_unix) },
            busy,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            image_server: self.0.config.image_server.clone(),
        }
    }

    /// The status as the `/status` page shows it.
    pub fn status_view(&self) -> StatusView {
        StatusView::from(&self.status())
    }
}

/// What /status and /metrics (see `fleet_daemon::serve_metrics`) show.
impl fleet_daemon::Monitored for Unpacker {
    type Status = StatusView;

    async fn status_page(&self) -> StatusView {
        self.status_view()
    }

    fn metrics_page(&self) -> String {
        self.metrics().render()
    }
}
