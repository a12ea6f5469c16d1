//! The unpacker's status as JSON: one typed view, for its `/status` page
//! and for `unpacker-tool --json`, so that both show the same fields under
//! the same names. A stream's state is its short lowercase name
//! ("unprepared", "verified", ...).

use serde::Serialize;

use crate::unpacker::{Device, Status, StreamState, StreamStatus};

/// The unpacker as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub version: String,
    pub image_server: String,
    pub idle_seconds: u64,
    pub busy: bool,
    pub devices: Vec<DeviceView>,
    pub streams: Vec<StreamView>,
}

/// A device the unpacker knows.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub volume_id: String,
    pub path: String,
    pub size_bytes: u64,
    /// "block" or "file".
    pub kind: String,
    /// The stream bound to it; empty when free.
    pub stream: String,
}

/// A stream and its device.
#[derive(Debug, Clone, Serialize)]
pub struct StreamView {
    pub stream: String,
    pub volume_id: String,
    pub device_path: String,
    pub state: String,
    pub leaf: String,
    pub image_id: String,
    pub image_size: u64,
    /// Seconds left of the capture holds on the stream (0: none).
    pub hold_seconds: u32,
    pub hold_leaf: String,
}

/// A stream state's short name: `STREAM_STATE_VERIFIED` is "verified".
pub fn state_name(state: StreamState) -> String {
    state.as_str_name().trim_start_matches("STREAM_STATE_").to_lowercase()
}

impl From<&Device> for DeviceView {
    fn from(d: &Device) -> DeviceView {
        DeviceView {
            volume_id: d.volume_id.clone(),
            path: d.path.clone(),
            size_bytes: d.size_bytes,
            kind: d.kind.clone(),
            stream: d.stream.clone(),
        }
    }
}

impl From<&StreamStatus> for StreamView {
    fn from(s: &StreamStatus) -> StreamView {
        StreamView {
            stream: s.stream.clone(),
            volume_id: s.volume_id.clone(),
            device_path: s.device_path.clone(),
            state: state_name(s.state()),
            leaf: s.leaf.clone(),
            image_id: s.image_id.clone(),
            image_size: s.image_size,
            hold_seconds: s.hold_seconds,
            hold_leaf: s.hold_leaf.clone(),
        }
    }
}

impl From<&Status> for StatusView {
    fn from(s: &Status) -> StatusView {
        StatusView {
            version: s.version.clone(),
            image_server: s.image_server.clone(),
            idle_seconds: s.idle_seconds,
            busy: s.busy,
            devices: s.devices.iter().map(DeviceView::from).collect(),
            streams: s.streams.iter().map(StreamView::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_state_reads_as_its_short_name() {
        let s = StreamStatus { state: StreamState::Verified.into(), ..Default::default() };
        assert_eq!(StreamView::from(&s).state, "verified");
        assert_eq!(state_name(StreamState::Unprepared), "unprepared");
    }
}
