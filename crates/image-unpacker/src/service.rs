//! The gRPC layer: every RPC of `proto/unpacker.proto`, as a thin shell over
//! the core (`crate::core`). A handler takes the request apart, calls the
//! core and turns its answer or error into tonic's types; it holds no lock,
//! keeps no state and makes no decision.
//!
//! **Invariant:** every call needs the drive-unpacker right ([`RIGHTS`],
//! applied to every call by one layer around the whole server, see
//! `lib.rs`, before any handler runs).

use std::pin::Pin;

use fleet_proto::unpacker::{
    AddDeviceRequest, AssociateRequest, Capture, ClaimDeviceRequest, Device, Empty, ForgetStreamRequest, GetRawRequest,
    GetStatusRequest, Lease, LeaseRequest, PrepareForCaptureRequest, PrepareForUnpackRequest, Progress, RawData,
    ReleaseCaptureRequest, RemoveDeviceRequest, RenewCaptureHoldRequest, Status as UnpackerStatus, StreamStatus,
    UnpackImageRequest, image_unpacker_server::ImageUnpacker,
};
use fleet_tls::{Right, Rights};
use futures::{Stream, StreamExt as _};
use tonic::{Code, Request, Response, Status};

// `metrics` names the unpacker by this path.
pub(crate) use crate::core::Unpacker;
use crate::core::{Error, ErrorKind};

/// The right each ImageUnpacker method needs: all of them need
/// drive-unpacker. A method missing here is refused to everyone, so a new
/// RPC needs an entry before anyone can call it.
pub const RIGHTS: Rights = Rights::new(&[
    ("/fleet.unpacker.v1.ImageUnpacker/GetStatus", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/AddDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/RemoveDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/ClaimDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/AssociateStreamWithDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/LeaseStreamSetup", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/PrepareForUnpack", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/UnpackImage", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/PrepareForCapture", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/ReleaseCapture", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/RenewCaptureHold", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/ForgetStream", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/GetRaw", Right::DriveUnpacker),
]);

type ProgressStream = Pin<Box<dyn Stream<Item = Result<Progress, Status>> + Send>>;
type RawStream = Pin<Box<dyn Stream<Item = Result<RawData, Status>> + Send>>;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match e.kind {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::Unimplemented => Code::Unimplemented,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DataLoss => Code::DataLoss,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Internal => Code::Internal,
        };
        Status::new(code, e.message)
    }
}

/// A stream of the core's items as a stream for tonic.
fn tonic_stream<T: Send + 'static>(
    s: Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(s.map(|item| item.map_err(Status::from)))
}

#[tonic::async_trait]
impl ImageUnpacker for Unpacker {
    async fn get_status(&self, _req: Request<GetStatusRequest>) -> Result<Response<UnpackerStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn add_device(&self, req: Request<AddDeviceRequest>) -> Result<Response<Device>, Status> {
        Ok(Response::new(Unpacker::add_device(self, req.into_inner()).await?))
    }

    async fn remove_device(&self, req: Request<RemoveDeviceRequest>) -> Result<Response<Empty>, Status> {
        Unpacker::remove_device(self, &req.into_inner().volume_id)?;
        Ok(Response::new(Empty {}))
    }

    async fn claim_device(&self, req: Request<ClaimDeviceRequest>) -> Result<Response<Device>, Status> {
        Ok(Response::new(Unpacker::claim_device(self, req.into_inner())?))
    }

    async fn lease_stream_setup(&self, req: Request<LeaseRequest>) -> Result<Response<Lease>, Status> {
        Ok(Response::new(Unpacker::lease_stream_setup(self, req.into_inner())?))
    }

    async fn associate_stream_with_device(
        &self,
        req: Request<AssociateRequest>,
    ) -> Result<Response<StreamStatus>, Status> {
        Ok(Response::new(self.associate(req.into_inner())?))
    }

    type PrepareForUnpackStream = ProgressStream;

    async fn prepare_for_unpack(
        &self,
        req: Request<PrepareForUnpackRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        Ok(Response::new(tonic_stream(Unpacker::prepare_for_unpack(self, req.into_inner())?)))
    }

    type UnpackImageStream = ProgressStream;

    async fn unpack_image(&self, req: Request<UnpackImageRequest>) -> Result<Response<ProgressStream>, Status> {
        Ok(Response::new(tonic_stream(Unpacker::unpack_image(self, req.into_inner())?)))
    }

    async fn prepare_for_capture(&self, req: Request<PrepareForCaptureRequest>) -> Result<Response<Capture>, Status> {
        Ok(Response::new(Unpacker::prepare_for_capture(self, req.into_inner()).await?))
    }

    async fn forget_stream(&self, req: Request<ForgetStreamRequest>) -> Result<Response<Empty>, Status> {
        Unpacker::forget_stream(self, &req.into_inner().stream).await?;
        Ok(Response::new(Empty {}))
    }

    async fn release_capture(&self, req: Request<ReleaseCaptureRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        Unpacker::release_capture(self, &r.stream, &r.hold_id)?;
        Ok(Response::new(Empty {}))
    }

    async fn renew_capture_hold(&self, req: Request<RenewCaptureHoldRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        Unpacker::renew_capture_hold(self, &r.stream, &r.hold_id, r.hold_seconds)?;
        Ok(Response::new(Empty {}))
    }

    type GetRawStream = RawStream;

    async fn get_raw(&self, req: Request<GetRawRequest>) -> Result<Response<RawStream>, Status> {
        Ok(Response::new(tonic_stream(Unpacker::get_raw(self, &req.into_inner().stream)?)))
    }
}
