//! Gradient checks (f64 central differences) of the model's layers: Linear and the
//! SwiGLU FFN, both B (input gradient) and W (weight gradient).

mod common;

use common::{check_gradient, project, random};
use flotilla_model::ffn::SwiGluFfn;
use flotilla_model::linear::Linear;

#[test]
fn linear_backward_matches_finite_differences() {
    let (rows, inp, out) = (5, 7, 3);
    let mut layer = Linear::<f64>::new("l", inp, out, 0.5, 1);
    let x = random(rows * inp, 2);
    let r = random(rows * out, 3);
    let mut dx = vec![0.0; rows * inp];
    layer.backward_input(&r, rows, &mut dx, false, 1).unwrap();
    layer.backward_weight(&r, &x, rows, 1).unwrap();
    let loss_x = |x: &[f64]| {
        let mut y = vec![0.0; rows * out];
        layer.forward(x, rows, &mut y, 1).unwrap();
        project(&y, &r)
    };
    check_gradient("linear dx", &x, &dx, 100, loss_x);
    let w = layer.weight.value.to_host_vec();
    let dw = layer.weight.grad.to_host_vec();
    let mut probe = layer.clone();
    check_gradient("linear dW", &w, &dw, 100, |w| {
        probe.weight.value.host_mut().copy_from_slice(w);
        let mut y = vec![0.0; rows * out];
        probe.forward(&x, rows, &mut y, 1).unwrap();
        project(&y, &r)
    });
    // W accumulates; B with `accumulate` adds.
    layer.backward_weight(&r, &x, rows, 1).unwrap();
    assert!(layer.weight.grad.host().iter().zip(&dw).all(|(a, b)| (a - 2.0 * b).abs() < 1e-12));
    let mut dx2 = dx.clone();
    layer.backward_input(&r, rows, &mut dx2, true, 1).unwrap();
    assert!(dx2.iter().zip(&dx).all(|(a, b)| (a - 2.0 * b).abs() < 1e-12));
}

#[test]
fn swiglu_ffn_backward_matches_finite_differences() {
    let (rows, hidden, inter) = (4, 6, 5);
    let mut ffn = SwiGluFfn::<f64>::new("ffn", hidden, inter, 0.5, 4);
    let x = random(rows * hidden, 5);
    let r = random(rows * hidden, 6);
    let mut y = vec![0.0; rows * hidden];
    let input = ffn.cache_input(&x, rows).unwrap();
    let cache = ffn.forward(&input, rows, &mut y, 1).unwrap();
    let mut dx = vec![0.0; rows * hidden];
    let grads = ffn.backward_input(&cache, &r, &mut dx, false, 1).unwrap();
    ffn.backward_weight(&cache, &grads, &input, 1).unwrap();

    let reference = ffn.clone();
    let loss = |f: &SwiGluFfn<f64>, x: &[f64]| {
        let mut y = vec![0.0; rows * hidden];
        f.forward(&f.cache_input(x, rows).unwrap(), rows, &mut y, 1).unwrap();
        project(&y, &r)
    };
    check_gradient("ffn dx", &x, &dx, 100, |x| loss(&reference, x));
    for which in 0..3 {
        let mut probe = reference.clone();
        let (value, grad) = {
            let p = &reference_params(&reference)[which];
            (p.0.clone(), p.1.clone())
        };
        check_gradient(&format!("ffn weight {which}"), &value, &grad, 60, |w| {
            probe.params_mut()[which].value.host_mut().copy_from_slice(w);
            loss(&probe, &x)
        });
    }
}

fn reference_params(f: &SwiGluFfn<f64>) -> [(Vec<f64>, Vec<f64>); 3] {
    [&f.gate_proj, &f.up_proj, &f.down_proj]
        .map(|l| (l.weight.value.to_host_vec(), l.weight.grad.to_host_vec()))
}
