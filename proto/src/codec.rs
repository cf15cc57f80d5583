//! The codec of every `flotilla.v1` service: prost's, except that a request that does not
//! decode is `INVALID_ARGUMENT` naming the message type, not `INTERNAL`.
//!
//! gRPC's status code guide makes a parse failure `INTERNAL`, and `tonic_prost` follows it;
//! but a peer that sends bytes which are not the message it must send made a bad request,
//! and an operator reading `INTERNAL` would look for a bug in the server. The encoder is
//! prost's unchanged; the generated clients and servers name this codec
//! (`build.rs`: `codec_path`).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct FlotillaCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for FlotillaCodec<T, U> {
    fn default() -> Self {
        FlotillaCodec { inner: ProstCodec::default() }
    }
}

impl<T, U> Codec for FlotillaCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = FlotillaDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FlotillaDecoder { inner: self.inner.decoder(), _message: PhantomData }
    }
}

/// [`ProstDecoder`] whose errors are `INVALID_ARGUMENT`, naming the message type.
#[derive(Debug)]
pub struct FlotillaDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for FlotillaDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| match status.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the bytes received are not a valid {} message: {}",
                message_name::<U>(),
                status.message()
            )),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// A message type's name without its module path (`WorkerInfo`).
fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::WorkerInfo;

    #[test]
    fn names_the_message_without_its_path() {
        assert_eq!(message_name::<WorkerInfo>(), "WorkerInfo");
    }
}
