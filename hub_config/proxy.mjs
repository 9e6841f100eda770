// configurable-http-proxy as the hub runs it: `node proxy.mjs <CHP package folder> [CHP options…]`.
//
// CHP (5.3.0, the newest) decodes every request path with decodeURIComponent to find its route, and
// answers a path that is not valid percent-encoding (e.g. /hub/api/users/x/servers/%ff) with a 500.
// Such a path is the client's mistake: here it gets a 400 (the hub's error page, like CHP's other
// errors); everything else is CHP unchanged.
import path from "node:path";
import { pathToFileURL } from "node:url";

const chp = process.argv.splice(2, 1)[0];
const { ConfigurableProxy } = await import(pathToFileURL(path.join(chp, "lib", "configproxy.js")).href);

function malformed(req) {
  try {
    decodeURIComponent(new URL(req.url, "http://localhost").pathname);
    return false;
  } catch (e) {
    return e instanceof URIError;
  }
}

for (const [method, kind] of [["handleProxyWeb", "web"], ["handleProxyWs", "ws"]]) {
  const original = ConfigurableProxy.prototype[method];
  ConfigurableProxy.prototype[method] = function (req, res, ...rest) {
    if (malformed(req)) {
      return this.handleProxyError(400, kind, req, res);
    }
    return original.call(this, req, res, ...rest);
  };
}

await import(pathToFileURL(path.join(chp, "bin", "configurable-http-proxy")).href);
