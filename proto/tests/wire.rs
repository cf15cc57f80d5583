//! The generated protocol: messages survive encoding, and the descriptor set served for
//! reflection names both services.

use flotilla_proto::FILE_DESCRIPTOR_SET;
use flotilla_proto::v1::{
    CoordinatorMessage, JobState, RunSteps, StepReport, WorkerMessage, coordinator_message, worker_message,
};
use prost::Message;

#[test]
fn messages_round_trip() {
    let report = WorkerMessage {
        body: Some(worker_message::Body::StepReport(StepReport {
            job_id: "job-1".into(),
            step: 7,
            loss: 1.25,
            mtp_ce: vec![2.5],
            ..Default::default()
        })),
    };
    assert_eq!(WorkerMessage::decode(report.encode_to_vec().as_slice()).unwrap(), report);

    let command = CoordinatorMessage {
        command_id: 3,
        body: Some(coordinator_message::Body::RunSteps(RunSteps {
            job_id: "job-1".into(),
            first_step: 0,
            count: 10,
        })),
    };
    assert_eq!(CoordinatorMessage::decode(command.encode_to_vec().as_slice()).unwrap(), command);
}

#[test]
fn truncated_input_is_an_error_not_a_panic() {
    let bytes = WorkerMessage {
        body: Some(worker_message::Body::StepReport(StepReport {
            job_id: "a long job id".into(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    assert!(WorkerMessage::decode(&bytes[..bytes.len() - 3]).is_err());
}

#[test]
fn the_descriptor_set_names_both_services() {
    let set = prost_types_free::decode_service_names(FILE_DESCRIPTOR_SET);
    assert!(set.contains(&"CoordinatorService".to_string()), "{set:?}");
    assert!(set.contains(&"JobService".to_string()), "{set:?}");
}

#[test]
fn terminal_states() {
    assert!(
        JobState::Succeeded.is_terminal()
            && JobState::Failed.is_terminal()
            && JobState::Cancelled.is_terminal()
    );
    assert!(!JobState::Running.is_terminal() && !JobState::Recovering.is_terminal());
}

/// Reads service names out of an encoded `FileDescriptorSet` with prost's wire format alone
/// (field 1 of the set: files; field 6 of a file: services; field 1 of a service: name).
mod prost_types_free {
    use prost::Message;

    #[derive(Message)]
    struct Set {
        #[prost(message, repeated, tag = "1")]
        files: Vec<File>,
    }
    #[derive(Message)]
    struct File {
        #[prost(message, repeated, tag = "6")]
        services: Vec<Service>,
    }
    #[derive(Message)]
    struct Service {
        #[prost(string, tag = "1")]
        name: String,
    }

    pub fn decode_service_names(bytes: &[u8]) -> Vec<String> {
        let set = Set::decode(bytes).expect("descriptor set");
        set.files.into_iter().flat_map(|f| f.services).map(|s| s.name).collect()
    }
}
