//! The standard services every daemon serves beside its own: gRPC health
//! (`grpc.health.v1.Health`: load balancers, Kubernetes gRPC probes) and
//! server reflection (grpcurl and other tools work without our .proto
//! files). Who may call them: see `fleet_tls::PROBES`.

use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

/// The health a daemon reports, for its own service and for the whole
/// server (the empty service name).
#[derive(Clone)]
pub struct Probes {
    reporter: HealthReporter,
    service: &'static str,
}

impl Probes {
    /// Report serving (ready) or not serving (its store is away, or it is
    /// draining).
    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status(self.service, status).await;
        self.reporter.set_service_status("", status).await;
    }
}

/// Health and reflection for a daemon serving `service` (its full name,
/// `fleet.imageserver.v1.ImageServer`), reporting serving. Reflection
/// advertises that service and health, and describes them with their
/// comments.
pub async fn probes(
    service: &'static str,
) -> Result<
    (Probes, HealthServer<impl Health>, ServerReflectionServer<impl ServerReflection>),
    tonic_reflection::server::Error,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    let probes = Probes { reporter, service };
    probes.set(true).await;
    Ok((probes, health, reflection))
}
